"""File storage for uploads and generated images: an interface and its backends.

``open_storage`` picks the backend from a URL: none or ``file:///ABS/DIR`` is the local
directory (default: ``<data_dir>/files``); ``s3://BUCKET[/PREFIX]`` is an S3-compatible bucket.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional
from urllib.parse import unquote, urlsplit

from .base import Storage


def open_storage(url: Optional[str], settings) -> Storage:
    url = url or getattr(settings, "storage_url", None)
    if not url or url.startswith("file:"):
        from .local import LocalStorage

        root = settings.files_dir
        if url:
            parts = urlsplit(url)
            if not (parts.netloc + parts.path):
                raise ValueError(f"file storage URL without a path: {url!r}")
            root = Path(unquote(parts.netloc + parts.path))
        return LocalStorage(root, max_file_bytes=settings.max_upload_bytes,
                            max_parts=settings.max_multipart_parts)
    if url.startswith("s3://"):
        from .s3 import S3Storage

        def opt(name, default=None):
            value = getattr(settings, name, None)
            return default if value is None else value

        return S3Storage.from_url(
            url,
            endpoint_url=opt("s3_endpoint_url"), region=opt("s3_region"),
            access_key_id=opt("s3_access_key_id"), secret_access_key=opt("s3_secret_access_key"),
            addressing_style=opt("s3_addressing_style", "auto"),
            presign_expiry_s=opt("s3_presign_expiry_s", 3600.0),
            public_base_url=opt("s3_public_base_url"),
            max_file_bytes=settings.max_upload_bytes, max_parts=settings.max_multipart_parts,
            timeout_s=opt("s3_timeout_s", 30.0), max_retries=opt("s3_max_retries", 5),
        )
    raise ValueError(f"unsupported storage URL {url!r} (file:///dir, s3://bucket/prefix)")

"""Service settings: every limit the HTTP server and the workers enforce, in one place.

Each field can be set from the environment as ``PULID_FLUX_<FIELD>`` (upper case); list fields
take a comma-separated string or a JSON list. CLI flags of ``pulid-flux serve`` / ``worker``
override the environment.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal, Optional

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

ENDPOINT_ID = "fal-ai/flux-pulid"


def _split_list(value):
    # "a,b" and '["a","b"]' are both accepted from the environment.
    if value is None:
        return []
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("["):
            import json

            return [str(v) for v in json.loads(text)]
        return [part.strip() for part in text.split(",") if part.strip()]
    return list(value)


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="PULID_FLUX_", extra="ignore")

    # --- where things live -------------------------------------------------------------
    data_dir: Path = Field(Path("data"), description="Queue database, files and keys live here.")
    public_url: Optional[str] = Field(
        None,
        description="Absolute base URL clients reach this server at (file URLs, webhooks). "
        "Default: derived from each request's Host header.",
    )
    files_public_url: Optional[str] = Field(
        None,
        description="Absolute base URL of a separate origin (e.g. https://files.example.com) that "
        "reaches this server and serves only /files/: file URLs use it, and the API origin "
        "redirects file reads there, so no uploaded file ever shares an origin with the API or "
        "the playground. Default: file URLs on the API's own origin.",
    )
    secret_key_file: Optional[Path] = Field(
        None, description="HMAC secret of upload URLs and tokens, created if absent; every API "
        "replica needs the same one. Default: <data_dir>/secret.key.",
    )
    webhook_key_file: Optional[Path] = Field(
        None, description="Ed25519 webhook signing key (PEM), created if absent; every API replica "
        "needs the same one. Default: <data_dir>/webhook_ed25519.pem.",
    )

    # --- HTTP server -------------------------------------------------------------------
    host: Optional[str] = Field(
        None, description="Bind address. Default: 127.0.0.1 without API keys, 0.0.0.0 with keys."
    )
    port: int = Field(8000, ge=0, le=65535)
    ssl_certfile: Optional[str] = None
    ssl_keyfile: Optional[str] = None
    api_keys: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Accepted `Authorization: Key …` values. Empty: no auth (loopback only by default).",
    )
    cors_origins: Annotated[list[str], NoDecode] = Field(
        default_factory=lambda: ["*"], description="Origins allowed to call the API from a browser."
    )
    allowed_hosts: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Without API keys, requests must name this server in `Host`: an IP address, "
        "localhost, public_url's host, or one of these names (DNS-rebinding guard); `*` = any.",
    )
    log_level: str = "info"

    # --- model / workers ---------------------------------------------------------------
    model: Optional[str] = Field(
        None, description="tiny | flux-dev. Default: flux-dev with a CUDA GPU, tiny otherwise."
    )
    device: Optional[str] = None
    weights_dir: Optional[str] = None
    download_free_space_margin_gb: float = Field(
        2.0, ge=0, description="Free disk space `pulid-flux download` wants beyond the bytes it will write."
    )
    offload: bool = False
    fp8: Optional[Literal["weights", "fast"]] = Field(
        None, description="fp8 transformer: weights (weight-only, the official --fp8) or fast (fp8 "
        "activations too, CUDA sm89+). Default: off. true/false are read as weights/off.",
    )
    compile: bool = False
    batch_cfg: Optional[bool] = Field(
        None, description="True CFG's prompt and negative passes in one batch-2 transformer call (faster, "
        "more activation memory); false: two calls. Default: batched unless `offload`.",
    )
    id_cache_size: int = Field(
        16, ge=0, le=4096,
        description="ID embeddings a worker keeps for repeated reference images (LRU); 0 disables.",
    )
    worker_warmup: bool = Field(
        True, description="A worker runs one 2-step generation at the default size before it "
        "reports ready, so that the first request does not pay for compilation and lazy set-up.",
    )
    local_workers: int = Field(1, ge=0, le=16, description="Workers `serve` starts and supervises.")
    worker_threads: int = Field(
        0, ge=0, le=1024, description="CPU threads of a worker's torch ops (OpenMP and MKL); 0: one "
        "per core. Set before torch loads.",
    )
    worker_omp_wait_policy: Literal["passive", "active"] = Field(
        "passive", description="OpenMP's idle-thread policy in a worker: passive threads sleep between "
        "ops; active ones spin and take CPU time from the API process and from each other.",
    )
    worker_restart_backoff_max_s: float = Field(
        30.0, gt=0, description="Longest wait before restarting a worker that keeps crashing."
    )
    worker_healthy_uptime_s: float = Field(
        60.0, gt=0, description="A worker that ran this long restarts without backoff after exiting."
    )
    worker_stop_grace_s: float = Field(
        10.0, gt=0, description="Time a worker gets to exit after its drain, on shutdown, before "
        "it is killed (`serve` waits worker_drain_timeout_s + this).",
    )
    worker_drain_timeout_s: float = Field(
        25.0, ge=0, description="On SIGTERM a worker finishes its running request for up to this "
        "long, then hands it back to the queue (a second SIGTERM hands it back at once).",
    )
    worker_result_retry_max_s: float = Field(
        5.0, gt=0, description="Longest wait between a worker's tries to write a result (or hand "
        "a request back) while the queue is unavailable; it keeps the result until it is back.",
    )
    model_load_max_failures: int = Field(
        3, ge=1, description="Consecutive model-load failures after which the worker reports "
        "`failed`: new submits get 503 and queued requests complete with the reason.",
    )
    model_load_retry_max_s: float = Field(
        60.0, gt=0, description="Longest wait between a worker's model-load attempts (it keeps "
        "retrying, so weights downloaded later are picked up without a restart).",
    )
    fault_retry_max_s: float = Field(
        30.0, gt=0, description="Longest wait of a worker or supervisor retrying after a fault of "
        "ours (full disk, unwritable queue) before it tries again.",
    )
    stale_sweep_interval_s: float = Field(
        5.0, gt=0, description="How often idle workers also re-queue requests of silent workers."
    )
    db_busy_timeout_s: float = Field(
        30.0, gt=0, description="How long a queue operation waits for the SQLite write lock."
    )
    worker_poll_interval_s: float = Field(0.1, gt=0, description="Idle worker's queue poll period.")
    heartbeat_interval_s: float = Field(1.0, gt=0, description="Worker lease renewal period.")
    lease_timeout_s: float = Field(
        20.0, gt=0, description="A running request whose worker is silent this long is re-queued."
    )
    max_attempts: int = Field(
        2, ge=1, le=10, description="Runs per request, counting re-runs after a worker crash."
    )
    step_delay_s: float = Field(
        0.0, ge=0, le=10, description="Artificial pause after each denoising step (tests, demos)."
    )

    # --- queue and retention -------------------------------------------------------------
    max_queue_length: int = Field(1000, ge=1, description="Waiting requests beyond this get 429.")
    # Per-key fairness (only with API keys: without them there is one user). Over a limit: 429.
    max_active_requests_per_key: int = Field(
        100, ge=1, description="Queued + running requests one key may have at once.",
    )
    max_status_streams_per_key: int = Field(
        32, ge=1, description="Status streams (SSE) one key may hold open at once, per API process.",
    )
    max_stored_bytes_per_key: int = Field(
        10 * 1024**3, ge=0, description="Bytes one key may keep in storage (uploads + outputs); "
        "at or over it, uploads and submits get 429 until files expire.",
    )
    max_request_cost: int = Field(
        2048 * 2048 * 50 * 2, ge=1, description="Largest width × height × steps × passes (2 with "
        "true_cfg > 1) × num_images of one request (422 beyond). Default: one 2048² image, 50 "
        "steps, true CFG.",
    )
    limit_retry_after_s: int = Field(
        10, ge=1, description="`Retry-After` sent with a per-key 429.",
    )
    result_ttl_s: float = Field(
        3600.0, gt=0, description="Completed requests and their files are deleted after this."
    )
    upload_ttl_s: float = Field(86400.0, gt=0, description="Uploaded files are deleted after this.")
    cleanup_interval_s: float = Field(30.0, gt=0, description="Period of the expiry sweep.")
    run_timeout_s: float = Field(
        1800.0, gt=0, description="Longest a sync `/run` call waits for its result (then 504)."
    )
    status_poll_interval_s: float = Field(
        0.05, gt=0, description="How often waiting HTTP handlers (run, SSE) re-read the queue."
    )
    sse_keepalive_s: float = Field(15.0, gt=0, description="SSE comment period on quiet streams.")
    health_timeout_s: float = Field(
        0.8, gt=0, description="Longest `/health` waits for the queue before it reports it "
        "unavailable (status degraded).",
    )
    status_stream_reads_per_s: float = Field(
        400.0, gt=0, description="Requests the status streams of one API process read per second, "
        "together (one read serves every stream of a request): with many watched requests each is "
        "read less often than status_poll_interval_s, so streams cannot crowd out other work.",
    )

    # --- distributed backends (docs/deployment.md) --------------------------------------------
    queue_url: Optional[str] = Field(
        None, description="redis://[:password@]host:port/db, rediss://…, or sqlite:///path. "
        "Default: the embedded SQLite queue in data_dir.",
    )
    storage_url: Optional[str] = Field(
        None, description="s3://bucket/prefix or file:///dir. Default: data_dir/files."
    )
    redis_key_prefix: str = Field("pulid-flux:", description="Namespace of every Redis key.")
    redis_visibility_timeout_s: Optional[float] = Field(
        None, gt=0, description="A running request whose worker stopped renewing it this long is "
        "taken over by another worker (XAUTOCLAIM). Default: lease_timeout_s.",
    )
    redis_retry_s: float = Field(
        2.0, ge=0, description="How long one Redis call retries through a blip (restart, "
        "failover); after it the queue counts as unavailable: API calls get 503, workers keep "
        "their results until it is back.",
    )
    redis_socket_timeout_s: float = Field(10.0, gt=0, description="Read timeout of one Redis call.")
    redis_connect_timeout_s: float = Field(
        0.5, gt=0, description="Timeout of one connection attempt to Redis."
    )
    redis_probe_interval_s: float = Field(
        1.0, gt=0, description="While Redis is unavailable, calls fail at once (503) but one per "
        "this period tries it again; the first that succeeds ends the outage.",
    )
    redis_consumer_prune_s: float = Field(
        3600.0, gt=0, description="Stream consumers of workers idle this long (holding nothing) "
        "are removed.",
    )
    webhook_claim_ttl_s: float = Field(
        7200.0, gt=0, description="A replica owns a webhook delivery (all its retries) this long; "
        "another replica takes over only after it.",
    )
    worker_alive_window_s: Optional[float] = Field(
        None, gt=0, description="Workers whose last heartbeat is this recent count as alive "
        "(/health, /metrics). Default: lease_timeout_s.",
    )
    s3_endpoint_url: Optional[str] = Field(
        None, description="S3 API endpoint (MinIO, R2, GCS interop, Ceph). Default: AWS."
    )
    s3_region: Optional[str] = Field(None, description="S3 region. Default: boto3's.")
    s3_access_key_id: Optional[str] = Field(
        None, description="Default: boto3's chain (AWS_ACCESS_KEY_ID, profiles, instance roles)."
    )
    s3_secret_access_key: Optional[str] = None
    s3_addressing_style: Literal["auto", "path", "virtual"] = Field(
        "auto", description="path for MinIO/Ceph without wildcard DNS."
    )
    s3_presign_expiry_s: float = Field(
        3600.0, gt=0, le=604800, description="Lifetime of presigned file URLs (SigV4: ≤ 7 days)."
    )
    s3_public_base_url: Optional[str] = Field(
        None, description="Public base URL of the bucket/CDN: file URLs become BASE/<key> "
        "instead of presigned URLs.",
    )
    s3_timeout_s: float = Field(30.0, gt=0, description="S3 connect/read timeout.")
    s3_max_retries: int = Field(5, ge=0, le=20, description="S3 call retries (boto3 standard).")

    # --- input limits ----------------------------------------------------------------------
    max_request_bytes: int = Field(
        64 * 1024 * 1024, ge=1024, description="Largest JSON request body (data URIs included)."
    )
    max_json_depth: int = Field(
        32, ge=2, le=256, description="Deepest nesting of JSON this server parses from multipart "
        "`complete` bodies, lifecycle headers and query values (deeper: 4xx).",
    )
    min_image_size: int = Field(256, ge=16, description="Smallest custom width/height.")
    max_image_size: int = Field(2048, ge=16, description="Largest custom width/height.")
    image_size_multiple: int = Field(
        16, ge=1, description="Custom sizes are rounded to the nearest multiple of this."
    )
    max_num_images: int = Field(4, ge=1, le=16, description="Upper bound of `num_images`.")
    max_reference_images: int = Field(
        4, ge=1, le=16, description="Most reference faces (reference_image_url + _urls)."
    )
    max_prompt_chars: int = Field(10000, ge=1, description="Longest prompt / negative prompt.")
    max_reference_bytes: int = Field(
        20 * 1024 * 1024, ge=1024, description="Largest reference image download."
    )
    max_reference_pixels: int = Field(
        40_000_000, ge=1, description="Largest decoded reference image (width × height)."
    )
    min_reference_side: int = Field(
        64, ge=1, description="Smallest reference width/height, checked at submit (the engine "
        "refuses images under 64 pixels a side: no usable face fits).",
    )
    fetch_timeout_s: float = Field(20.0, gt=0, description="Total time to fetch one reference.")
    fetch_max_redirects: int = Field(3, ge=0, le=20)
    fetch_allowed_private_cidrs: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Private/loopback networks reference and webhook URLs may point into "
        "(SSRF allow-list), e.g. 127.0.0.0/8 for a receiver on this host.",
    )

    # --- storage -----------------------------------------------------------------------------
    max_upload_bytes: int = Field(
        1024 * 1024 * 1024, ge=1024, description="Largest uploaded file (single or multipart)."
    )
    max_multipart_parts: int = Field(10000, ge=1, description="Most parts of one multipart upload.")
    min_free_disk_bytes: int = Field(
        32 * 1024 * 1024, ge=0, description="/health reports local storage or the SQLite queue "
        "`degraded` when their disk has less free space than this.",
    )
    max_complete_body_bytes: int = Field(
        1024 * 1024, ge=1024, description="Largest multipart `complete` body (the part list); 413 above."
    )
    upload_url_ttl_s: float = Field(
        3600.0, gt=0, description="Lifetime of signed upload URLs (never beyond the token that asked)."
    )
    storage_token_ttl_s: float = Field(
        3600.0, gt=0, description="Lifetime of CDN upload tokens; also caps `/rest/tokens/` ones."
    )
    mint_tokens_from_tokens: bool = Field(
        False, description="Whether a token (not only an API key) may obtain new tokens from "
        "`/rest/tokens/` and `/rest/storage/auth/token`; minted tokens never outlive their parent.",
    )
    client_token_default_ttl_s: float = Field(
        120.0, gt=0, description="Lifetime of a `/rest/tokens/` token when the caller names none."
    )
    jpeg_quality: int = Field(95, ge=1, le=100)

    # --- webhooks ------------------------------------------------------------------------------
    webhook_poll_interval_s: float = Field(0.5, gt=0, description="Delivery loop period.")
    webhook_concurrency: int = Field(8, ge=1, description="Webhooks delivered at once.")
    # fal: "up to 10 retries within 2 hours"; these defaults spread 10 retries over 0.9-1.7 h
    webhook_max_attempts: int = Field(
        11, ge=1, le=50, description="Tries per webhook, the first included."
    )
    webhook_base_delay_s: float = Field(
        10.0, gt=0, description="First retry delay; doubles (jittered)."
    )
    webhook_max_delay_s: float = Field(1800.0, gt=0, description="Longest wait between tries.")
    webhook_timeout_s: float = Field(15.0, gt=0, description="Time allowed for one attempt.")

    @field_validator("fp8", mode="before")
    @classmethod
    def _fp8_mode(cls, value):
        # the flag used to be a boolean
        text = str(value).strip().lower() if value is not None else ""
        if text in ("", "0", "false", "no", "off", "none"):
            return None
        return "weights" if text in ("1", "true", "yes", "on") else value

    @field_validator("api_keys", "cors_origins", "fetch_allowed_private_cidrs", "allowed_hosts",
                     mode="before")
    @classmethod
    def _lists(cls, value):
        return _split_list(value)

    @property
    def bind_host(self) -> str:
        if self.host:
            return self.host
        return "0.0.0.0" if self.api_keys else "127.0.0.1"

    @property
    def alive_window_s(self) -> float:
        return self.worker_alive_window_s or self.lease_timeout_s

    @property
    def db_path(self) -> Path:
        return Path(self.data_dir) / "queue.sqlite3"

    @property
    def files_dir(self) -> Path:
        return Path(self.data_dir) / "files"

    @property
    def secret_path(self) -> Path:
        return self.secret_key_file or Path(self.data_dir) / "secret.key"

    @property
    def webhook_key_path(self) -> Path:
        return self.webhook_key_file or Path(self.data_dir) / "webhook_ed25519.pem"

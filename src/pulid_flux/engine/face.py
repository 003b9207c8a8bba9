"""PuLID's face step: detect, pick one face, align, remove the background, run EVA.

Official flow (doc §2.3-2.6): insightface gives the ArcFace vector of the largest face,
facexlib's RetinaFace gives the landmarks of the aligned 512 crop. The official code
takes the *centre* face for the crop, which can be another person than the ArcFace
face; here the crop uses the RetinaFace face that overlaps the chosen insightface face,
or the insightface keypoints when none does, so both always describe the same person.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Protocol, Sequence, Union

import cv2
import numpy as np
import torch
import torchvision.transforms.functional as TF
from PIL import Image
from torch import nn
from torchvision.transforms import InterpolationMode

from .eva import eva_features
from .types import NoFaceError

# FFHQ 5-point template for a 512x512 crop (left eye, right eye, nose, mouth left, mouth right).
FFHQ_TEMPLATE_512 = np.array(
    [[192.98138, 239.94708], [318.90277, 240.1936], [256.63416, 314.01935],
     [201.26117, 371.41043], [313.08905, 371.15118]],
    dtype=np.float32,
)
# The official code pads with (135,133,132) on a BGR image; on RGB that is (132,133,135).
ALIGN_BORDER_RGB = (132, 133, 135)

BISENET_NUM_CLASSES = 19
# background, cloth, hat, l_ear, r_ear, earring, neck, necklace (hair and glasses are kept)
BACKGROUND_LABELS = (0, 16, 18, 7, 8, 9, 14, 15)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

RETINAFACE_CONF = 0.97  # facexlib get_face_landmarks_5 threshold used by PuLID
INSIGHTFACE_DET_SIZE = (640, 640)
# A RetinaFace box must overlap the chosen insightface box at least this much to be
# taken as the same face; two different faces in one photo barely overlap.
ALIGN_MATCH_MIN_IOU = 0.3
MTCNN_MIN_PROB = 0.95  # drops MTCNN's weak hits (hands, patterns) that SCRFD would not report
ARCFACE_SIZE = 112
ARCFACE_DIM = 512

NO_FACE_MESSAGE = (
    "No face was found in the reference image. Please upload a clear photo in which "
    "a face is visible and not too small."
)


@dataclass
class Face:
    bbox: np.ndarray  # [4] x1, y1, x2, y2 in image pixels
    kps: np.ndarray  # [5, 2] left eye, right eye, nose, mouth left, mouth right
    score: float
    embedding: Optional[np.ndarray] = None  # raw (un-normalised) 512-d ArcFace vector

    @property
    def area(self) -> float:
        x1, y1, x2, y2 = (float(v) for v in self.bbox[:4])
        return max(0.0, x2 - x1) * max(0.0, y2 - y1)


class FaceAnalyzer(Protocol):
    """A detection/recognition backend."""

    def analyze(self, image_rgb: np.ndarray) -> tuple[list[Face], list[Face]]:
        """(identity faces, with embeddings where available; alignment-landmark faces)."""

    def embed_aligned(self, aligned_rgb: np.ndarray) -> np.ndarray:
        """Raw ArcFace vector [512] of a 512x512 aligned crop (fallback path)."""


# ----------------------------------------------------------------------------- selection


def box_iou(a: np.ndarray, b: np.ndarray) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return float(inter / union) if union > 0 else 0.0


def _pick(faces: Sequence[Face], face_index: Optional[int]) -> Face:
    ordered = sorted(faces, key=lambda f: f.area, reverse=True)  # largest first
    index = 0 if face_index is None else int(face_index)
    if index < 0 or index >= len(ordered):
        raise NoFaceError(
            f"No face was found in the reference image at face_index {index}: "
            f"{len(ordered)} face(s) were detected (face_index counts from 0, largest face first)."
        )
    return ordered[index]


@dataclass
class FaceChoice:
    identity: Optional[Face]  # the face whose ArcFace vector is used (None: fallback on the crop)
    alignment: Face  # the face whose landmarks make the aligned crop
    matched_iou: float  # overlap between the two (1.0 when they are the same record)


def choose_face(
    identity_faces: Sequence[Face], alignment_faces: Sequence[Face], face_index: Optional[int] = None
) -> FaceChoice:
    """Pick the face_index-th largest identity face and the alignment face of the same person."""
    if identity_faces:
        chosen = _pick(identity_faces, face_index)
        best, best_iou = None, 0.0
        for cand in alignment_faces:
            iou = box_iou(chosen.bbox, cand.bbox)
            if iou > best_iou:
                best, best_iou = cand, iou
        if best is not None and best_iou >= ALIGN_MATCH_MIN_IOU:
            return FaceChoice(chosen, best, best_iou)
        return FaceChoice(chosen, chosen, 1.0)  # no matching landmarks: use its own keypoints
    if alignment_faces:
        # official fallback: ArcFace on the aligned crop when the identity detector finds nothing
        return FaceChoice(None, _pick(alignment_faces, face_index), 1.0)
    raise NoFaceError(NO_FACE_MESSAGE)


# ----------------------------------------------------------------------------- alignment


def alignment_matrix(kps: np.ndarray, size: int = 512) -> np.ndarray:
    template = FFHQ_TEMPLATE_512 * (size / 512.0)
    matrix, _ = cv2.estimateAffinePartial2D(
        np.asarray(kps, np.float32).reshape(5, 2), template, method=cv2.LMEDS
    )
    if matrix is None:
        raise NoFaceError(NO_FACE_MESSAGE)
    return matrix


def align_face(image_rgb: np.ndarray, kps: np.ndarray, size: int = 512) -> np.ndarray:
    """Similarity-warp the face onto the FFHQ template, as facexlib's align_warp_face."""
    matrix = alignment_matrix(kps, size)
    return cv2.warpAffine(
        image_rgb, matrix, (size, size), borderMode=cv2.BORDER_CONSTANT, borderValue=ALIGN_BORDER_RGB
    )


# ----------------------------------------------------------------------------- parsing / EVA input


def build_bisenet(state_dict: Optional[dict] = None) -> nn.Module:
    """facexlib BiSeNet(19); random init (from the caller's torch seed) when no weights."""
    from facexlib.parsing.bisenet import BiSeNet

    model = BiSeNet(num_class=BISENET_NUM_CLASSES)
    if state_dict is not None:
        prefix = "face_parse."
        if all(k.startswith(prefix) for k in state_dict):
            state_dict = {k[len(prefix):]: v for k, v in state_dict.items()}
        model.load_state_dict(state_dict, strict=True)
    return model.eval()


def load_bisenet_checkpoint(path: Union[str, Path]) -> nn.Module:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"Face parsing weights not found: {path} (expected parsing_bisenet.pth); run: pulid-flux download"
        )
    return build_bisenet(torch.load(path, map_location="cpu", weights_only=True))


def background_mask(parser: nn.Module, face_rgb01: torch.Tensor) -> torch.Tensor:
    """True where BiSeNet labels the pixel background/cloth/hat/ears/neck: [B,1,H,W] bool."""
    x = TF.normalize(face_rgb01, IMAGENET_MEAN, IMAGENET_STD)
    labels = parser(x)[0].argmax(dim=1, keepdim=True)
    bg = torch.zeros_like(labels, dtype=torch.bool)
    for label in BACKGROUND_LABELS:
        bg |= labels == label
    return bg


def face_features_image(face_rgb01: torch.Tensor, bg_mask: torch.Tensor) -> torch.Tensor:
    """White background, gray face repeated to 3 channels (what EVA sees)."""
    gray = 0.299 * face_rgb01[:, 0:1] + 0.587 * face_rgb01[:, 1:2] + 0.114 * face_rgb01[:, 2:3]
    gray = gray.repeat(1, 3, 1, 1)
    return torch.where(bg_mask, torch.ones_like(gray), gray)


def eva_preprocess(features_image: torch.Tensor, size: int = 336) -> torch.Tensor:
    # antialias=True: torchvision >= 0.17 behaviour, which the reference fixtures use (doc §2.6)
    x = TF.resize(features_image, size, interpolation=InterpolationMode.BICUBIC, antialias=True)
    return TF.normalize(x, CLIP_MEAN, CLIP_STD)


# ----------------------------------------------------------------------------- backends


def onnx_providers(device: Union[str, torch.device]) -> list[str]:
    import onnxruntime

    device = torch.device(device)
    if device.type == "cuda" and "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


def _ctx_id(device: torch.device) -> int:
    return (device.index or 0) if device.type == "cuda" else -1


class InsightFaceAnalyzer:
    """Production: antelopev2 (SCRFD + glintr100) for identity, RetinaFace-R50 for landmarks."""

    def __init__(self, app, retinaface, recognizer):
        self.app = app
        self.retinaface = retinaface
        self.recognizer = recognizer  # an insightface ArcFaceONNX (glintr100)

    def analyze(self, image_rgb: np.ndarray) -> tuple[list[Face], list[Face]]:
        bgr = np.ascontiguousarray(image_rgb[:, :, ::-1])
        identity = [
            Face(np.asarray(f.bbox, np.float32), np.asarray(f.kps, np.float32), float(f.det_score),
                 None if f.embedding is None else np.asarray(f.embedding, np.float32))
            for f in self.app.get(bgr)
        ]
        with torch.no_grad():
            rows = self.retinaface.detect_faces(bgr, RETINAFACE_CONF)
        alignment = [
            Face(np.asarray(r[0:4], np.float32), np.asarray(r[5:15], np.float32).reshape(5, 2), float(r[4]))
            for r in np.asarray(rows)
        ]
        return identity, alignment

    def embed_aligned(self, aligned_rgb: np.ndarray) -> np.ndarray:
        # get_feat resizes to 112 and swaps BGR->RGB itself, like handler_ante.get_feat
        bgr = np.ascontiguousarray(aligned_rgb[:, :, ::-1])
        return np.asarray(self.recognizer.get_feat(bgr), np.float32).reshape(-1)


def build_insightface_analyzer(
    insightface_root: Union[str, Path],
    facexlib_root: Union[str, Path],
    device: Union[str, torch.device] = "cpu",
) -> InsightFaceAnalyzer:
    """`insightface_root/models/antelopev2/*.onnx` and `facexlib_root/detection_Resnet50_Final.pth`."""
    from facexlib.detection import init_detection_model
    from insightface.app import FaceAnalysis

    device = torch.device(device)
    model_dir = Path(insightface_root) / "models" / "antelopev2"
    retina_file = Path(facexlib_root) / "detection_Resnet50_Final.pth"
    for needed in (model_dir / "scrfd_10g_bnkps.onnx", model_dir / "glintr100.onnx", retina_file):
        if not needed.is_file():  # check first: both libraries would try to download
            raise FileNotFoundError(f"Face model not found: {needed}; run: pulid-flux download")
    providers = onnx_providers(device)
    # An absolute name: insightface would otherwise first look for ./antelopev2 in the working dir.
    app = FaceAnalysis(
        name=str(model_dir.resolve()), root=str(insightface_root),
        allowed_modules=["detection", "recognition"], providers=providers,
    )
    app.prepare(ctx_id=_ctx_id(device), det_size=INSIGHTFACE_DET_SIZE)
    retinaface = init_detection_model("retinaface_resnet50", device=device, model_rootpath=str(facexlib_root))
    # the recognition model of antelopev2 is glintr100, the same file as the official handler_ante
    return InsightFaceAnalyzer(app, retinaface, app.models["recognition"])


class TinyArcFace(nn.Module):
    """Random-weight stand-in for ArcFace: 112x112 RGB crop (0..255) -> raw 512-d vector."""

    def __init__(self, dim: int = ARCFACE_DIM):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(3, 16, 3, stride=2, padding=1), nn.PReLU(16),
            nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.PReLU(32),
            nn.Conv2d(32, 64, 3, stride=2, padding=1), nn.PReLU(64),
            nn.AdaptiveAvgPool2d(4), nn.Flatten(), nn.Linear(64 * 16, dim),
        )

    def forward(self, crops: torch.Tensor) -> torch.Tensor:
        return self.net((crops - 127.5) / 127.5)  # ArcFace input scaling


def build_tiny_arcface(seed: int = 0) -> TinyArcFace:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return TinyArcFace().eval()


class MtcnnAnalyzer:
    """Offline: facenet-pytorch MTCNN (real weights) for boxes + 5 points, TinyArcFace for vectors."""

    def __init__(self, mtcnn, arcface: nn.Module, device: Union[str, torch.device] = "cpu",
                 min_prob: float = MTCNN_MIN_PROB):
        self.mtcnn = mtcnn
        self.arcface = arcface
        self.device = torch.device(device)
        self.min_prob = min_prob

    @torch.no_grad()
    def _embed(self, crops_rgb: list[np.ndarray]) -> np.ndarray:
        x = torch.from_numpy(np.stack(crops_rgb)).permute(0, 3, 1, 2).float().to(self.device)
        dtype = next(self.arcface.parameters()).dtype
        return self.arcface(x.to(dtype)).float().cpu().numpy()

    def analyze(self, image_rgb: np.ndarray) -> tuple[list[Face], list[Face]]:
        from insightface.utils.face_align import norm_crop

        boxes, probs, points = self.mtcnn.detect(np.ascontiguousarray(image_rgb), landmarks=True)
        if boxes is None:
            return [], []
        # facenet-pytorch returns object arrays for several faces under numpy 2
        boxes = np.array(boxes.tolist(), np.float32).reshape(-1, 4)
        probs = np.array(probs.tolist(), np.float32).reshape(-1)
        points = np.array(points.tolist(), np.float32).reshape(-1, 5, 2)
        keep = probs >= self.min_prob
        faces = [Face(b, p, float(s)) for b, p, s in zip(boxes[keep], points[keep], probs[keep])]
        if faces:
            crops = [norm_crop(image_rgb, f.kps, image_size=ARCFACE_SIZE) for f in faces]
            for face, emb in zip(faces, self._embed(crops)):
                face.embedding = emb
        return faces, faces  # one detector: the same records give identity and landmarks

    def embed_aligned(self, aligned_rgb: np.ndarray) -> np.ndarray:
        crop = cv2.resize(aligned_rgb, (ARCFACE_SIZE, ARCFACE_SIZE), interpolation=cv2.INTER_LINEAR)
        return self._embed([crop])[0]


def build_tiny_face_analyzer(device: Union[str, torch.device] = "cpu", seed: int = 0) -> MtcnnAnalyzer:
    from facenet_pytorch import MTCNN

    device = torch.device(device)
    mtcnn = MTCNN(keep_all=True, device=device)
    return MtcnnAnalyzer(mtcnn, build_tiny_arcface(seed).to(device), device)


# ----------------------------------------------------------------------------- encoder


@dataclass
class FaceSelection:
    choice: FaceChoice
    aligned: np.ndarray  # [512, 512, 3] uint8 RGB crop of choice.alignment
    arcface: np.ndarray  # raw [512] vector of the same face


class FaceEncoder:
    """One normalised RGB reference image -> (id_cond [1, 512+E], 5 EVA hidden states)."""

    def __init__(self, analyzer: FaceAnalyzer, parser: nn.Module, eva: nn.Module,
                 device: Union[str, torch.device] = "cpu", dtype: torch.dtype = torch.float32):
        self.analyzer = analyzer
        self.device = torch.device(device)
        self.dtype = dtype
        self.parser = parser.to(self.device, torch.float32).eval()  # argmax is precision sensitive
        self.eva = eva.to(self.device, dtype).eval()
        self.eva_size = int(eva.patch_embed.img_size[0])

    def select(self, image_rgb: np.ndarray, face_index: Optional[int] = None) -> FaceSelection:
        identity, alignment = self.analyzer.analyze(image_rgb)
        choice = choose_face(identity, alignment, face_index)
        aligned = align_face(image_rgb, choice.alignment.kps)
        if choice.identity is not None and choice.identity.embedding is not None:
            arcface = choice.identity.embedding
        else:
            arcface = self.analyzer.embed_aligned(aligned)
        return FaceSelection(choice, aligned, np.asarray(arcface, np.float32).reshape(-1))

    @torch.no_grad()
    def encode(self, image: Image.Image, face_index: Optional[int] = None
               ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        image_rgb = np.asarray(image.convert("RGB"))
        sel = self.select(image_rgb, face_index)
        face = torch.from_numpy(sel.aligned).permute(2, 0, 1)[None].float().div(255.0).to(self.device)
        bg = background_mask(self.parser, face)
        eva_in = eva_preprocess(face_features_image(face, bg), self.eva_size).to(self.dtype)
        normed, _, hidden = eva_features(self.eva, eva_in)
        arcface = torch.from_numpy(sel.arcface)[None].to(self.device, self.dtype)
        return torch.cat([arcface, normed], dim=-1), hidden

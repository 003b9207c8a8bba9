"""Face step: parity of the parsing/gray/EVA-input path, alignment, face choice, backends."""

from pathlib import Path

import cv2
import insightface
import numpy as np
import pytest
import skimage.data
import torch
from PIL import Image
from safetensors.torch import load_file
from torch import nn

from pulid_flux.engine.eva import build_eva
from pulid_flux.engine.face import (
    ALIGN_BORDER_RGB,
    ALIGN_MATCH_MIN_IOU,
    FFHQ_TEMPLATE_512,
    Face,
    FaceEncoder,
    InsightFaceAnalyzer,
    align_face,
    alignment_matrix,
    background_mask,
    build_bisenet,
    build_insightface_analyzer,
    build_tiny_face_analyzer,
    choose_face,
    eva_preprocess,
    face_features_image,
)
from pulid_flux.engine.types import NoFaceError

from reference import reference_dir

FIXTURES = reference_dir()
INSIGHTFACE_IMAGES = Path(insightface.__file__).parent / "data" / "images"
TOL = 1e-4


def _read_rgb(name):
    return np.ascontiguousarray(cv2.imread(str(INSIGHTFACE_IMAGES / name))[:, :, ::-1])


def _tensors(name):
    path = FIXTURES / f"{name}.safetensors"
    return {k: (v.float() if v.is_floating_point() else v) for k, v in load_file(path).items()}


@pytest.fixture(scope="module")
def analyzer():
    return build_tiny_face_analyzer("cpu", seed=0)


@pytest.fixture(scope="module")
def encoder(analyzer):
    torch.manual_seed(0)
    cfg = {"embed_dim": 32, "vision_cfg": {"width": 64, "layers": 21, "head_width": 64}}
    return FaceEncoder(analyzer, build_bisenet(), build_eva(cfg), device="cpu", dtype=torch.float32)


# ----------------------------------------------------------------------------- parity


def test_face_features_parity_with_official():
    t = _tensors("face_features")
    parser = build_bisenet({k: v for k, v in t.items() if k.startswith("face_parse.")})
    face = t["aligned_face_rgb"].permute(2, 0, 1)[None].float() / 255.0
    with torch.no_grad():
        bg = background_mask(parser, face)
    reliable = t["reliable_mask"].bool()
    assert bg.dtype == torch.bool and bg.shape == (1, 1, 512, 512)
    assert torch.equal(bg[reliable], t["background_mask"].bool()[reliable])
    features = face_features_image(face, bg)
    rel3 = reliable.expand(-1, 3, -1, -1)
    assert (features - t["face_features_image"])[rel3].abs().max().item() <= TOL
    eva_in = eva_preprocess(features)
    eva_rel = t["eva_input_reliable_mask"].bool().expand(-1, 3, -1, -1)
    assert eva_in.shape == (1, 3, 336, 336)
    assert (eva_in - t["eva_input"])[eva_rel].abs().max().item() <= TOL
    # the resize + normalise step alone, everywhere
    assert (eva_preprocess(t["face_features_image"]) - t["eva_input"]).abs().max().item() <= TOL


def test_face_features_image_is_white_background_gray_face():
    face = torch.rand(1, 3, 8, 8)
    bg = torch.zeros(1, 1, 8, 8, dtype=torch.bool)
    bg[..., :4] = True
    out = face_features_image(face, bg)
    assert (out[..., :4] == 1.0).all()
    gray = 0.299 * face[:, 0] + 0.587 * face[:, 1] + 0.114 * face[:, 2]
    for c in range(3):
        assert torch.allclose(out[:, c, :, 4:], gray[..., 4:])


# ----------------------------------------------------------------------------- alignment


def test_align_face_maps_landmarks_to_ffhq_template_with_rgb_border():
    kps = FFHQ_TEMPLATE_512 * 0.3 + np.array([40.0, -60.0], np.float32)  # crop top sticks out of the photo
    image = np.zeros((200, 240, 3), np.uint8)
    image[:] = (10, 200, 30)
    matrix = alignment_matrix(kps)
    mapped = cv2.transform(kps[None].astype(np.float64), matrix)[0]
    assert np.abs(mapped - FFHQ_TEMPLATE_512).max() < 1e-2
    aligned = align_face(image, kps)
    assert aligned.shape == (512, 512, 3) and aligned.dtype == np.uint8
    assert tuple(aligned[0, 0]) == ALIGN_BORDER_RGB == (132, 133, 135)  # outside the photo
    assert tuple(aligned[256, 256]) == (10, 200, 30)  # inside the photo, channels untouched


def test_mtcnn_landmark_order_is_eyes_nose_mouth(analyzer):
    faces, align_faces = analyzer.analyze(skimage.data.astronaut())
    assert len(faces) == 1 and faces is align_faces
    (le, re, nose, ml, mr) = faces[0].kps
    assert le[0] < re[0] and ml[0] < mr[0]  # image-left first
    assert max(le[1], re[1]) < nose[1] < min(ml[1], mr[1])
    assert faces[0].score > 0.99 and faces[0].embedding.shape == (512,)


# ----------------------------------------------------------------------------- face choice (pure logic)


def _face(x1, y1, x2, y2, emb=None):
    w, h = x2 - x1, y2 - y1
    kps = np.array([[x1 + 0.3 * w, y1 + 0.4 * h], [x1 + 0.7 * w, y1 + 0.4 * h], [x1 + 0.5 * w, y1 + 0.6 * h],
                    [x1 + 0.35 * w, y1 + 0.8 * h], [x1 + 0.65 * w, y1 + 0.8 * h]], np.float32)
    return Face(np.array([x1, y1, x2, y2], np.float32), kps, 0.9, emb)


def test_choose_face_matches_alignment_face_of_the_same_person():
    small, large = _face(10, 10, 60, 70, np.ones(512)), _face(200, 50, 320, 200, np.zeros(512))
    # RetinaFace-like records: slightly different boxes, other order, plus an extra face
    large_r, small_r, other_r = _face(205, 45, 318, 205), _face(12, 8, 61, 72), _face(400, 300, 480, 400)
    choice = choose_face([small, large], [small_r, other_r, large_r])
    assert choice.identity is large and choice.alignment is large_r
    assert choice.matched_iou >= ALIGN_MATCH_MIN_IOU
    choice = choose_face([small, large], [small_r, other_r, large_r], face_index=1)
    assert choice.identity is small and choice.alignment is small_r
    # no landmark face overlaps: align with the identity face's own keypoints
    choice = choose_face([small, large], [other_r])
    assert choice.identity is large and choice.alignment is large
    # the identity detector found nothing: fallback on the landmark faces, largest first
    choice = choose_face([], [small_r, large_r])
    assert choice.identity is None and choice.alignment is large_r


@pytest.mark.parametrize("index", [2, 5, -1])
def test_choose_face_index_out_of_range(index):
    with pytest.raises(NoFaceError, match="No face was found in the reference image"):
        choose_face([_face(0, 0, 50, 50), _face(100, 0, 130, 30)], [], face_index=index)


def test_choose_face_nothing_found():
    with pytest.raises(NoFaceError, match="No face was found in the reference image"):
        choose_face([], [])


# ----------------------------------------------------------------------------- tiny backend, real photos


def test_encode_single_face(encoder):
    image = skimage.data.astronaut()
    id_cond, hidden = encoder.encode(Image.fromarray(image))
    assert id_cond.shape == (1, 512 + 32) and id_cond.dtype == torch.float32
    assert len(hidden) == 5 and all(h.shape == (1, 577, 64) for h in hidden)
    assert torch.isfinite(id_cond).all()
    assert abs(id_cond[0, 512:].norm().item() - 1.0) < 1e-5  # EVA CLS part is L2-normalised
    sel = encoder.select(image)  # a second run gives the same face and vector
    assert np.allclose(id_cond[0, :512].numpy(), sel.arcface)  # raw ArcFace part, not normalised
    assert abs(np.linalg.norm(sel.arcface) - 1.0) > 0.1
    # the fixture aligned the astronaut by her eyes at (201.5,100.5)/(246.5,103.5); MTCNN agrees
    eyes = sel.choice.alignment.kps[:2]
    assert np.abs(eyes - np.array([[201.5, 100.5], [246.5, 103.5]])).max() < 6.0


def test_tight_face_crop_photo(encoder):
    # insightface's Tom Hanks sample is a 112x112 ArcFace crop: the face fills the image
    image = _read_rgb("Tom_Hanks_54745.png")
    sel = encoder.select(image)
    assert sel.aligned.shape == (512, 512, 3)
    assert sel.choice.identity is sel.choice.alignment
    assert sel.choice.identity.area > 0.5 * image.shape[0] * image.shape[1]
    # the pipeline may ask for bf16: EVA and the outputs follow, parsing stays float32
    # (a 112-px EVA keeps bf16 on the CPU fast; the encoder reads the input size from the model)
    cfg = {"embed_dim": 32, "vision_cfg": {"width": 64, "layers": 21, "head_width": 64, "image_size": 112}}
    bf16 = FaceEncoder(encoder.analyzer, encoder.parser, build_eva(cfg), dtype=torch.bfloat16)
    id_cond, hidden = bf16.encode(Image.fromarray(image))
    assert id_cond.dtype == torch.bfloat16 and all(h.dtype == torch.bfloat16 for h in hidden)
    assert all(h.shape == (1, 1 + 8 * 8, 64) for h in hidden)
    assert next(bf16.parser.parameters()).dtype == torch.float32
    assert torch.allclose(id_cond[0, :512].float(), torch.from_numpy(sel.arcface), rtol=1e-2, atol=1e-2)


GRADIENT = np.tile(np.linspace(0, 255, 400, dtype=np.float32)[None, :, None], (300, 1, 3)).astype(np.uint8)


@pytest.mark.parametrize("image", [skimage.data.coffee(), GRADIENT], ids=["coffee", "gradient"])
def test_no_face_is_refused(encoder, image):
    with pytest.raises(NoFaceError, match="No face was found in the reference image"):
        encoder.encode(Image.fromarray(image))


def test_group_photo_largest_by_default_and_face_index(encoder):
    full = _read_rgb("t1.jpg")
    image = cv2.resize(full, (full.shape[1] // 2, full.shape[0] // 2), interpolation=cv2.INTER_AREA)  # speed
    faces, _ = encoder.analyzer.analyze(image)
    assert len(faces) >= 5
    areas = sorted((f.area for f in faces), reverse=True)
    first, second = encoder.select(image), encoder.select(image, face_index=1)
    assert first.choice.identity.area == areas[0]
    assert second.choice.identity.area == areas[1]
    for sel in (first, second):
        # the ArcFace face and the aligned crop are the same detection
        assert np.array_equal(sel.choice.identity.kps, sel.choice.alignment.kps)
        x1, y1, x2, y2 = sel.choice.identity.bbox
        kps = sel.choice.alignment.kps
        assert ((kps[:, 0] > x1) & (kps[:, 0] < x2) & (kps[:, 1] > y1) & (kps[:, 1] < y2)).all()
    assert box_distance(first.choice.identity.bbox, second.choice.identity.bbox) > 25
    assert not np.allclose(first.arcface, second.arcface)
    assert not np.array_equal(first.aligned, second.aligned)
    with pytest.raises(NoFaceError, match="face_index"):
        encoder.select(image, face_index=len(faces))


def box_distance(a, b):
    return float(np.hypot((a[0] + a[2] - b[0] - b[2]) / 2, (a[1] + a[3] - b[1] - b[3]) / 2))


def test_fallback_arcface_on_aligned_crop(encoder):
    class NoIdentity:  # identity detector finds nothing, landmarks do (official get_feat fallback)
        def __init__(self, inner):
            self.inner = inner

        def analyze(self, image_rgb):
            _, align = self.inner.analyze(image_rgb)
            return [], align

        def embed_aligned(self, aligned_rgb):
            return self.inner.embed_aligned(aligned_rgb)

    fallback = FaceEncoder(NoIdentity(encoder.analyzer), encoder.parser, encoder.eva)
    image = skimage.data.astronaut()
    sel = fallback.select(image)
    assert sel.choice.identity is None
    assert np.allclose(sel.arcface, encoder.analyzer.embed_aligned(sel.aligned))
    assert not np.allclose(sel.arcface, encoder.select(image).arcface)  # 512 crop, not the 112 norm_crop


# ----------------------------------------------------------------------------- production backend plumbing


class _ConstSCRFD(nn.Module):
    """SCRFD-shaped ONNX stand-in (9 outputs, strides 8/16/32, 2 anchors) that always reports
    the given faces; the input only enters as x*0 so the graph keeps it."""

    def __init__(self, faces_det):
        super().__init__()
        outs = []
        for stride in (8, 16, 32):
            n = (640 // stride) ** 2 * 2
            outs.append([torch.zeros(n, 1), torch.ones(n, 4), torch.zeros(n, 10)])
        scores, boxes, kpss = outs[2]
        for bbox, kps in faces_det:
            cx, cy = (bbox[0] + bbox[2]) / 2, (bbox[1] + bbox[3]) / 2
            gx, gy = int(round(cx / 32)), int(round(cy / 32))
            idx = (gy * 20 + gx) * 2
            ax, ay = gx * 32.0, gy * 32.0
            scores[idx] = 0.9
            boxes[idx] = torch.tensor([ax - bbox[0], ay - bbox[1], bbox[2] - ax, bbox[3] - ay]) / 32
            kpss[idx] = torch.from_numpy((kps - np.array([ax, ay])).reshape(-1) / 32).float()
        flat = [o[0] for o in outs] + [o[1] for o in outs] + [o[2] for o in outs]
        for i, t in enumerate(flat):
            self.register_buffer(f"o{i}", t)

    def forward(self, x):
        zero = x.mean() * 0
        return tuple(getattr(self, f"o{i}") + zero for i in range(9))


class _TinyRecognizer(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(3, 8, 4, stride=4), nn.ReLU(), nn.AdaptiveAvgPool2d(4), nn.Flatten(), nn.Linear(128, 512)
        )

    def forward(self, x):
        return self.net(x) * 10.0  # raw ArcFace vectors are far from unit norm


def _export(module, path, shape, names):
    torch.onnx.export(
        module.eval(), torch.zeros(shape), str(path),
        input_names=["input.1"], output_names=names, dynamo=False, opset_version=17,
    )


@pytest.fixture(scope="module")
def production_dirs(tmp_path_factory, analyzer):
    """antelopev2-layout folder with tiny ONNX models + random RetinaFace weights, built in code."""
    from facexlib.detection.retinaface import RetinaFace

    root = tmp_path_factory.mktemp("weights")
    image = _read_rgb("t1.jpg")[140:420, 40:600].copy()  # three faces, small for speed
    faces, _ = analyzer.analyze(image)
    planted = sorted(faces, key=lambda f: f.bbox[0])[::2]  # the left and the right face
    det_scale = int(640 * image.shape[0] / image.shape[1]) / image.shape[0]  # SCRFD's letterbox
    model_dir = root / "insightface" / "models" / "antelopev2"
    model_dir.mkdir(parents=True)
    torch.manual_seed(3)
    _export(_ConstSCRFD([(f.bbox * det_scale, f.kps * det_scale) for f in planted]),
            model_dir / "scrfd_10g_bnkps.onnx", (1, 3, 640, 640),
            [f"{k}_{s}" for k in ("score", "bbox", "kps") for s in (8, 16, 32)])
    _export(_TinyRecognizer(), model_dir / "glintr100.onnx", (1, 3, 112, 112), ["embedding"])
    facexlib_dir = root / "facexlib"
    facexlib_dir.mkdir()
    torch.save(RetinaFace(network_name="resnet50", device="cpu").state_dict(),
               facexlib_dir / "detection_Resnet50_Final.pth")
    return root / "insightface", facexlib_dir, image, planted


class _RetinaStub:
    """facexlib RetinaFace.detect_faces output rows: box(4), score, 5 landmarks (x, y)."""

    def __init__(self, faces):
        self.rows = np.array([np.concatenate([f.bbox, [0.99], f.kps.reshape(-1)]) for f in faces], np.float32)
        self.calls = []

    def detect_faces(self, image, conf_threshold=0.8, nms_threshold=0.4, use_origin_size=True):
        self.calls.append((image.shape, conf_threshold))
        return self.rows.reshape(-1, 15)


def test_production_backend_with_tiny_onnx_models(production_dirs, encoder):
    insight_root, facexlib_dir, image, planted = production_dirs
    prod = build_insightface_analyzer(insight_root, facexlib_dir, device="cpu")
    assert isinstance(prod, InsightFaceAnalyzer)
    identity, alignment = prod.analyze(image)  # real SCRFD decode, real random-weight RetinaFace
    assert all(f.kps.shape == (5, 2) for f in alignment)
    assert len(identity) == 2
    for face in identity:
        ref = min(planted, key=lambda p: box_distance(p.bbox, face.bbox))
        assert np.abs(face.bbox - ref.bbox).max() < 1.0 and np.abs(face.kps - ref.kps).max() < 1.0
        # raw embedding of glintr100-like model on the 112 norm_crop (BGR in, RGB to the net)
        from insightface.utils.face_align import norm_crop

        crop = norm_crop(image[:, :, ::-1], face.kps, image_size=112)
        blob = ((crop[:, :, ::-1].astype(np.float32) - 127.5) / 127.5).transpose(2, 0, 1)[None]
        expected = prod.recognizer.session.run(None, {"input.1": blob})[0][0]
        assert np.allclose(face.embedding, expected, atol=1e-3)
        assert abs(np.linalg.norm(face.embedding) - 1.0) > 0.1  # not normed_embedding

    # landmarks from a RetinaFace whose boxes differ a little and come in another order
    shifted = [Face(f.bbox + 2.0, f.kps + 1.5, 0.99) for f in faces_by_x(image, encoder)][::-1]
    prod.retinaface = _RetinaStub(shifted)
    enc = FaceEncoder(prod, encoder.parser, encoder.eva)
    big = enc.select(image)
    largest = max(identity, key=lambda f: f.area)
    assert np.allclose(big.choice.identity.bbox, largest.bbox)
    assert big.choice.alignment.score == pytest.approx(0.99)  # came from RetinaFace
    assert np.abs(big.choice.alignment.kps - big.choice.identity.kps).max() < 3.0  # same person
    assert prod.retinaface.calls[-1][1] == pytest.approx(0.97)
    other = enc.select(image, face_index=1)
    assert box_distance(other.choice.alignment.bbox, other.choice.identity.bbox) < 5.0
    assert box_distance(other.choice.identity.bbox, big.choice.identity.bbox) > 100
    id_cond, hidden = enc.encode(Image.fromarray(image))
    assert np.allclose(id_cond[0, :512].numpy(), largest.embedding, atol=1e-5)
    with pytest.raises(NoFaceError):
        enc.select(image, face_index=2)

    # fallback when SCRFD finds nothing: glintr100 on the aligned 512 crop
    prod.retinaface = _RetinaStub(shifted[:1])
    blank = image.copy()
    prod.app.det_model.det_thresh = 2.0  # nothing passes: identity list is empty
    sel = enc.select(blank)
    assert sel.choice.identity is None
    crop112 = cv2.resize(sel.aligned, (112, 112))
    blob = ((crop112.astype(np.float32) - 127.5) / 127.5).transpose(2, 0, 1)[None]
    expected = prod.recognizer.session.run(None, {"input.1": blob})[0][0]
    assert np.allclose(sel.arcface, expected, atol=1e-2)


def faces_by_x(image, encoder):
    faces, _ = encoder.analyzer.analyze(image)
    return sorted(faces, key=lambda f: f.bbox[0])


def test_production_builder_reports_missing_weights(tmp_path):
    with pytest.raises(FileNotFoundError, match="pulid-flux download"):
        build_insightface_analyzer(tmp_path / "insightface", tmp_path / "facexlib")

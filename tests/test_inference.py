"""Inference API (`harmoclip_jax.inference`) and the predict CLI, on a model trained in this test module."""
import json
import os
import pathlib
import re
import shlex
import sys

import jax
import numpy as np
import pytest
from PIL import Image

from harmoclip_jax.inference import InputError, Predictor, check_boxes, parse_boxes
import warm_python
from trainer_helpers import subprocess_env

ROOT = pathlib.Path(__file__).resolve().parents[1]
LABELS = ["red star", "green cross", "orange ring", "yellow circle", "blue square"]


def _env():
    return subprocess_env()


def _run(*args, cwd=ROOT, check=True):
    proc = warm_python.run([sys.executable, *args], cwd=cwd, env=_env(), timeout=240)  # `-m` CLIs: warm children
    if check and proc.returncode != 0:
        raise AssertionError(f"{args} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A real training workdir: 4 steps of the demo's smoke setting (test-tiny on scenes/tiny), checkpoints at
    steps 2 and 4 and the params export."""
    path = tmp_path_factory.mktemp("inference") / "run"
    _run("-m", "harmoclip_jax.main", "--config=configs/demo.py:smoke,noeval", f"--workdir={path}",
         "--config.progress_bar=False", "--config.plot=False")
    return path


@pytest.fixture(scope="module")
def predictor(workdir):
    return Predictor.from_checkpoint(workdir, batch_size=4, text_batch_size=16, box_bucket=4)


@pytest.fixture(scope="module")
def val_records(workdir):
    from harmoclip_jax.data import pipeline

    return pipeline.open_source("scenes/tiny", "val")


def _params(model):
    from flax import nnx

    return [np.asarray(x) for x in jax.tree.leaves(nnx.state(model, nnx.Param))]


def _photo(seed, width, height):
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


# ------------------------------------------------------------------------------------------------ loading


def test_workdir_loads_latest_checkpoint_equal_to_params_export(workdir, predictor):
    assert predictor.source.endswith("training checkpoint step 4")
    export = Predictor.from_checkpoint(workdir / "params")
    assert export.source.startswith("params checkpoint")
    texts = ["a red star", "a small blue square on the left"]
    for a, b in zip(_params(export.model), _params(predictor.model)):
        np.testing.assert_array_equal(a, b)  # the export is the final training state
    # The training config's region settings come along (also for the params dir inside the workdir).
    assert predictor.region.output_size == export.region.output_size == 1
    earlier = Predictor.from_checkpoint(workdir, step=2)
    assert earlier.source.endswith("step 2")
    assert np.abs(earlier.encode_texts(texts) - predictor.encode_texts(texts)).max() > 1e-4  # it trained
    with pytest.raises(InputError, match=r"no training checkpoint at step 3; it has steps \[2, 4\]"):
        Predictor.from_checkpoint(workdir, step=3)


def test_hf_directory_and_open_clip_file(tmp_path):
    from harmoclip_jax.models import convert
    from flax import nnx

    from harmoclip_jax.models.clip import CLIP

    model = CLIP("test-tiny", rngs=nnx.Rngs(3))
    convert.save_hf_clip(model, tmp_path / "hf")
    from_hf = Predictor.from_checkpoint(tmp_path / "hf")  # auto-detected
    assert from_hf.source.startswith("Hugging Face CLIPModel")
    convert.save_open_clip(model, tmp_path / "model.safetensors")
    from_oc = Predictor.from_open_clip(tmp_path / "model.safetensors", "test-tiny")
    for other in (from_hf, from_oc):  # the conversions are exact (their numerics are tested in test_convert)
        for a, b in zip(_params(other.model), _params(model)):
            np.testing.assert_array_equal(a, b)
    with pytest.raises(InputError, match="from_open_clip"):
        Predictor.from_checkpoint(tmp_path / "model.safetensors")


# ------------------------------------------------------------------------------------- numbers vs references


def test_embeddings_match_the_eval_pipeline_on_dataset_records(workdir, predictor, val_records):
    """A record's JPEG file through the API == the eval pipeline's batch through the trainer's functions."""
    from harmoclip_jax.data import pipeline
    from harmoclip_jax.ops.regions import region_embeddings

    inputs = pipeline.ModelInputs(image_size=64, image_mean=predictor.backbone.image_mean,
                                  image_std=predictor.backbone.image_std, tokenizer="clip", context_length=48)
    transform = pipeline.EvalTransform(source=val_records, record_indices=np.arange(3), inputs=inputs,
                                       max_regions=4, num_captions=5, split_name="val")
    model = predictor.model
    reference = jax.jit(lambda images, boxes: region_embeddings(
        model.encode_dense(images), boxes, stride=16, output_size=predictor.region.output_size,
        sampling_ratio=predictor.region.sampling_ratio))
    for i in range(3):
        example, record = transform(i), val_records[i]
        path = workdir.parent / f"record{i}.jpg"
        path.write_bytes(record["image"])
        width, height = Image.open(path).size
        n = int(example["box_mask"].sum())
        pixel_boxes = np.asarray(record["regions"]["box"]) * [width, height, width, height]
        [got] = predictor.encode_regions(str(path), pixel_boxes)
        want = reference(example["image"][None], example["boxes"][None])[0, :n]  # one shape: one compilation
        want = np.asarray(want) / np.linalg.norm(want, axis=-1, keepdims=True)
        np.testing.assert_allclose(got, want, atol=2e-5)
        image_embed = np.asarray(model.encode_image(example["image"][None]))
        np.testing.assert_allclose(predictor.encode_images([path]), image_embed / np.linalg.norm(image_embed),
                                   atol=2e-5)


def test_any_size_image_boxes_are_rescaled_to_the_squashed_input(predictor):
    from harmoclip_jax.data.pipeline import decode_image
    from harmoclip_jax.ops.regions import region_embeddings

    image = _photo(1, 150, 90)  # (H=90, W=150) squashed to 64 x 64
    boxes = np.array([[0, 0, 150, 90], [15, 9, 75, 54]], np.float32)
    scaled = boxes * np.array([64 / 150, 64 / 90, 64 / 150, 64 / 90], np.float32)
    want = region_embeddings(predictor.model.encode_dense(decode_image(image, 64)[None]), scaled[None], stride=16,
                             output_size=predictor.region.output_size,
                             sampling_ratio=predictor.region.sampling_ratio)[0]
    want = np.asarray(want) / np.linalg.norm(want, axis=-1, keepdims=True)
    np.testing.assert_allclose(predictor.encode_regions(image, boxes)[0], want, atol=2e-5)
    # PIL input and xywh boxes give the same numbers.
    xywh = np.concatenate([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], 1)
    np.testing.assert_allclose(predictor.encode_regions(Image.fromarray(image), xywh, box_format="xywh")[0], want,
                               atol=2e-5)


def test_classify_regions_is_the_scaled_softmax_of_prompt_ensemble_cosines(predictor):
    from harmoclip_jax.evaluators.box_classification import DEFAULT_TEMPLATES
    from harmoclip_jax.tokenizer import tokenize

    image = _photo(2, 96, 96)
    boxes = [[0, 0, 48, 48], [40, 30, 96, 90], [10, 60, 30, 80]]
    result = predictor.classify_regions(image, boxes, LABELS, top_k=2)
    # Independent reference: per label, the mean of the normalised template embeddings, renormalised.
    model = predictor.model
    tokens = tokenize([t.format(label) for label in LABELS for t in DEFAULT_TEMPLATES], context_length=48)
    text = np.array(model.encode_text(tokens)).reshape(len(LABELS), len(DEFAULT_TEMPLATES), -1)
    text /= np.linalg.norm(text, axis=-1, keepdims=True)
    classes = text.mean(1) / np.linalg.norm(text.mean(1), axis=-1, keepdims=True)
    [regions] = predictor.encode_regions(image, boxes)
    logits = np.exp(float(model.logit_scale[...])) * regions @ classes.T
    probs = np.exp(logits - logits.max(1, keepdims=True))
    probs /= probs.sum(1, keepdims=True)
    np.testing.assert_allclose(result.probs, probs, atol=1e-5)
    for t, prediction in enumerate(result.top_k):
        order = np.argsort(-probs[t])[:2]
        assert prediction.labels == [LABELS[c] for c in order]
        np.testing.assert_allclose(prediction.scores, probs[t, order], atol=1e-5)
        assert prediction.box == [float(v) for v in boxes[t]]
    json.dumps(result.to_dict())  # JSON-able
    assert len(predictor.classify_regions(image, boxes, LABELS[:2], top_k=5).top_k[0].labels) == 2
    # Custom templates change the class embeddings.
    other = predictor.classify_regions(image, boxes, LABELS, templates=["{}"])
    assert np.abs(other.probs - result.probs).max() > 1e-4


def test_batches_are_padded_so_repeated_calls_do_not_recompile(predictor):
    predictor = Predictor(predictor.model, region=predictor.region, batch_size=4, text_batch_size=16, box_bucket=4)
    images = [_photo(10 + i, 40 + 7 * i, 30 + 11 * i) for i in range(7)]  # 7 sizes, 2 batches of 4
    embeds = predictor.encode_images(images)
    for i in (0, 6):  # batching and padding do not change the numbers
        np.testing.assert_allclose(embeds[i], predictor.encode_images([images[i]])[0], atol=2e-5)
    for n_boxes, n_labels in ((1, 2), (3, 5), (4, 3), (2, 1)):
        boxes = [[0, 0, 20 + i, 20 + i] for i in range(n_boxes)]
        predictor.classify_regions(images[3], boxes, [f"thing {j}" for j in range(n_labels)])
    texts = [f"a photo number {i}" for i in range(37)]  # 3 text batches of 16
    predictor.encode_texts(texts)
    assert predictor.trace_counts == {"images": 1, "regions": 1, "texts": 1}
    per_image = predictor.encode_regions(images[:5], [[[0, 0, 10, 10]]] * 4 + [[[0, 0, 9, 9]] * 6])
    assert [len(r) for r in per_image] == [1, 1, 1, 1, 6]
    np.testing.assert_allclose(per_image[4][0], predictor.encode_regions(images[4], [[0, 0, 9, 9]])[0][0], atol=2e-5)
    assert predictor.trace_counts["regions"] == 2  # 6 boxes need the next bucket (8 slots): one more shape


def test_retrieve_over_a_folder(predictor, val_records, tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(5):
        (folder / f"{i:02d}.jpg").write_bytes(val_records[i]["image"])
    (folder / "notes.txt").write_text("not an image")
    result = predictor.retrieve(["a red star", "a blue ring"], folder, top_k=3)
    assert result.images == [str(folder / f"{i:02d}.jpg") for i in range(5)]
    texts, images = predictor.encode_texts(result.queries), predictor.encode_images(folder)
    np.testing.assert_allclose(result.cosine, texts @ images.T, atol=1e-6)
    for q in range(2):
        np.testing.assert_array_equal(result.ranking[q], np.argsort(-result.cosine[q])[:3])
        assert [name for name, _ in result.top(q)] == [result.images[j] for j in result.ranking[q]]
    json.dumps(result.to_dict())


# ----------------------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("boxes, message", [
    ([10, 10, 20, 20], r"shape \(T, 4\).*one box: \[\[x1, y1, x2, y2\]\]"),
    ([[10, 10, 20]], r"shape \(T, 4\)"),
    ([], r"shape \(T, 4\)"),
    (np.zeros((0, 4)), "no boxes given"),
    ([[10, 10, 5, 30]], r"box 0 \[10.0, 10.0, 5.0, 30.0\] has x2 <= x1.*box_format='xywh'"),
    ([[0, 0, 10, 10], [50, 10, 130, 40]], r"box 1 .* lies outside the image, which is 100 wide and 60 high"),
    ([[0.1, 0.2, 0.5, 0.6]], "smaller than one pixel.*normalised"),
    ([[0, float("nan"), 10, 10]], "non-finite"),
    ("1,2,3,4", "numbers shaped"),
])
def test_bad_boxes(boxes, message):
    with pytest.raises(InputError, match=message):
        check_boxes(boxes, (100, 60))


def test_boxes_within_half_a_pixel_are_clipped_and_formats_convert():
    np.testing.assert_array_equal(check_boxes([[-0.4, 0, 100.3, 60]], (100, 60)), [[0, 0, 100, 60]])
    np.testing.assert_array_equal(check_boxes([[10, 20, 30, 5]], (100, 60), "xywh"), [[10, 20, 40, 25]])
    np.testing.assert_array_equal(check_boxes([[50, 30, 20, 10]], (100, 60), "cxcywh"), [[40, 25, 60, 35]])
    np.testing.assert_array_equal(parse_boxes("1,2,3,4; 5 6 7 8;"), [[1, 2, 3, 4], [5, 6, 7, 8]])
    with pytest.raises(InputError, match="box 1 '5,6,7' has 3 numbers"):
        parse_boxes("1,2,3,4;5,6,7")
    with pytest.raises(InputError, match="box_format"):
        check_boxes([[0, 0, 1, 1]], (10, 10), "yxyx")


def test_bad_images_labels_and_checkpoints(predictor, tmp_path):
    image, box = _photo(0, 32, 32), [[0, 0, 16, 16]]
    cases = [
        (lambda: predictor.classify_regions(image, box, []), "labels is empty"),
        (lambda: predictor.classify_regions(image, box, "cat"), "single string 'cat'"),
        (lambda: predictor.classify_regions(image, box, ["cat", "cat"]), "'cat' appears more than once"),
        (lambda: predictor.classify_regions(image, box, ["cat", " "]), "entry 1 is empty"),
        (lambda: predictor.classify_regions(image, box, ["cat"], templates=["a photo"]), "must contain '{}'"),
        (lambda: predictor.classify_regions(image, box, ["cat"], top_k=0), "top_k=0"),
        (lambda: predictor.classify_regions(tmp_path / "missing.jpg", box, ["cat"]), "does not exist"),
        (lambda: predictor.classify_regions(image.astype(np.float32) / 255, box, ["cat"]), "must be uint8"),
        (lambda: predictor.classify_regions(image[..., :2], box, ["cat"]), r"\(H, W, 3\)"),
        (lambda: predictor.encode_images(tmp_path / "empty_folder_that_is_missing"), "does not exist"),
        (lambda: predictor.retrieve([], [image]), "query_texts is empty"),
        (lambda: predictor.encode_regions([image, image], [box]), "2 images but 1 box lists"),
        (lambda: Predictor.from_checkpoint(tmp_path / "nowhere"), "does not exist"),
        (lambda: Predictor.from_checkpoint(tmp_path), "not a checkpoint this loader knows"),
    ]
    garbage = tmp_path / "broken.jpg"
    garbage.write_bytes(b"\xff\xd8\xff\xe0 this is not really a jpeg")
    cases.append((lambda: predictor.classify_regions(garbage, box, ["cat"]), r"broken.jpg\): cannot read the image"))
    truncated = tmp_path / "truncated.png"
    Image.fromarray(_photo(0, 64, 64)).save(truncated)
    truncated.write_bytes(truncated.read_bytes()[:200])
    cases.append((lambda: predictor.encode_images([image, truncated]), "truncated.png.*cannot read the image"))
    for call, message in cases:
        with pytest.raises(InputError, match=message):
            call()


# ------------------------------------------------------------------------------------------------------ CLI


def _doc_blocks(language: str) -> list[str]:
    text = (ROOT / "docs" / "inference.md").read_text()
    return re.findall(rf"```{language}\n(.*?)```", text, flags=re.S)


def _doc_commands() -> list[list[str]]:
    """The shell commands of docs/inference.md's walkthrough (continuation lines joined, comments dropped)."""
    script = _doc_blocks("bash")[0].replace("\\\n", " ")
    return [shlex.split(line) for line in script.splitlines() if line.startswith("python ")]


def test_docs_walkthrough_gives_a_labelled_picture(workdir, tmp_path):
    """docs/inference.md "From nothing to a labelled picture", run as written (the trained checkpoint of this module
    stands in for workdirs/demo; step 1, training, is the fixture's smoke setting of the same command)."""
    train, export_scene, label = _doc_commands()
    assert train[:3] == ["python", "-m", "harmoclip_jax.main"] and "--config=configs/demo.py" in train
    export = json.loads(_run(*export_scene[1:], cwd=tmp_path).stdout)
    assert (tmp_path / "scene.jpg").exists()
    assert export["ground_truth"] == ["red star", "green cross", "orange ring", "yellow circle"]
    assert export["command"].startswith("python -m harmoclip_jax.predict --checkpoint")
    label = [str(workdir) if arg == "workdirs/demo" else arg for arg in label]
    boxes = parse_boxes(label[label.index("--boxes") + 1])
    np.testing.assert_allclose(boxes, parse_boxes(export["boxes"]))  # the documented boxes are the scene's
    labels = label[label.index("--labels") + 1].split(",")
    report = json.loads(_run(*label[1:], cwd=tmp_path).stdout)
    assert report["image_size"] == [128, 128] and report["labels"] == labels
    assert report["checkpoint"].endswith("training checkpoint step 4")
    assert len(report["regions"]) == 4
    for region, box in zip(report["regions"], boxes):
        np.testing.assert_allclose(region["box"], box, atol=0.01)
        scores = [t["score"] for t in region["top"]]
        assert len(scores) == 3 and scores == sorted(scores, reverse=True) and 0 < sum(scores) <= 1.0001
        assert {t["label"] for t in region["top"]} <= set(labels)
    picture = Image.open(tmp_path / "scene_labelled.png")
    assert picture.size == (512, 512)  # 128 px upscaled for readable labels
    # The first box's outline is drawn in the first palette colour (#e6194b).
    x1, y1, x2, y2 = (np.array(report["regions"][0]["box"]) * 4).round().astype(int)
    pixels = np.asarray(picture.convert("RGB"))
    assert tuple(pixels[(y1 + y2) // 2, x1 + 1]) == (0xE6, 0x19, 0x4B)
    # The Python API block of the same page, on the same files.
    folder = tmp_path / "my_folder"
    folder.mkdir()
    for i in range(3):
        Image.fromarray(_photo(i, 50 + 10 * i, 40)).save(folder / f"{i}.png")
    code = _doc_blocks("python")[0].replace('"workdirs/demo"', repr(str(workdir)))
    namespace = {}
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        exec(compile(code, "docs/inference.md", "exec"), namespace)
    finally:
        os.chdir(cwd)
    assert (tmp_path / "labelled.png").exists()
    assert namespace["index"].shape == (3, 32) and namespace["texts"].shape == (2, 32)
    assert namespace["regions"].shape == (1, 32) and len(namespace["hits"].top(0)) == 3


def test_predict_cli_scene_shortcut_and_errors(workdir, tmp_path):
    report = json.loads(_run("-m", "harmoclip_jax.predict", "--checkpoint", str(workdir / "params"), "--scene",
                             "test:0", "--show", "2", "--out", "scene.png", cwd=tmp_path).stdout)
    assert len(report["labels"]) == 36 and (tmp_path / "scene.png").exists()
    assert all("ground_truth" in region for region in report["regions"])
    bad = _run("-m", "harmoclip_jax.predict", "--checkpoint", str(workdir), "--image", str(tmp_path / "scene.png"),
               "--boxes", "10,10,900,20", "--labels", "a,b", cwd=tmp_path, check=False)
    assert bad.returncode == 1 and "lies outside the image, which is 512 wide" in bad.stderr
    usage = _run("-m", "harmoclip_jax.predict", "--checkpoint", str(workdir), "--image", "x.jpg", cwd=tmp_path,
                 check=False)
    assert usage.returncode == 2 and "give --image and --boxes" in usage.stderr


def test_predict_cli_open_clip_file_labels_file_templates_xywh(tmp_path):
    from flax import nnx

    from harmoclip_jax.models import convert
    from harmoclip_jax.models.clip import CLIP

    convert.save_open_clip(CLIP("test-tiny", rngs=nnx.Rngs(1)), tmp_path / "model.safetensors")
    (tmp_path / "labels.txt").write_text("cat\n\ndog\nsofa\n")
    Image.fromarray(_photo(4, 200, 120)).save(tmp_path / "photo.png")
    report = json.loads(_run("-m", "harmoclip_jax.predict", "--open_clip", "model.safetensors", "--variant",
                             "test-tiny", "--image", "photo.png", "--boxes", "10,20,50,40;0,0,200,120",
                             "--box_format", "xywh", "--labels_file", "labels.txt", "--template", "a photo of a {}.",
                             "--template", "{}", "--top_k", "1", cwd=tmp_path).stdout)
    assert report["checkpoint"].startswith("open_clip state dict model.safetensors (test-tiny)")
    assert report["labels"] == ["cat", "dog", "sofa"] and report["image_size"] == [200, 120]
    assert [r["box"] for r in report["regions"]] == [[10, 20, 60, 60], [0, 0, 200, 120]]
    assert all(len(r["top"]) == 1 for r in report["regions"])


# ------------------------------------------------------------------------------------------------- dense maps


def _halves(width, height, vertical):
    """A red / blue image split in two: left | right (`vertical` split line) or top / bottom."""
    image = np.zeros((height, width, 3), np.uint8)
    if vertical:
        image[:, : width // 2, 0], image[:, width // 2:, 2] = 255, 255
    else:
        image[: height // 2, :, 0], image[height // 2:, :, 2] = 255, 255
    return image


def _colour_oracle(red, blue, p=16):
    """An `_encode_patches` whose features are known: per p x p patch, `red` (a unit embedding) where the patch's
    normalised red channel beats its blue one, else `blue`. Position-free, so only a right window placement and
    upsampling put the labels where the colours are."""
    def encode_patches(state, images):
        images = np.asarray(images)
        b, s = images.shape[:2]
        grid = images.reshape(b, s // p, p, s // p, p, 3).mean((2, 4))
        return np.where((grid[..., 0] > grid[..., 2])[..., None], red, blue).astype(np.float32)
    return encode_patches


@pytest.fixture(scope="module")
def tiny_predictor():
    from flax import nnx

    from harmoclip_jax.models.clip import CLIP

    return Predictor(CLIP("test-tiny", rngs=nnx.Rngs(5)), batch_size=4)  # 64 px input, 16 px patches: a 4 x 4 grid


@pytest.mark.parametrize("width,height,vertical", [(90, 60, True), (60, 90, False)])
def test_oracle_maps_and_labels_are_right_at_the_image_size(tiny_predictor, width, height, vertical):
    labels = ["red thing", "blue thing"]
    classes = tiny_predictor.class_embeddings(labels)
    jitted = tiny_predictor._encode_patches
    tiny_predictor._encode_patches = _colour_oracle(classes[0], classes[1])
    try:
        image = _halves(width, height, vertical)
        truth = np.zeros((height, width), np.int32)
        if vertical:
            truth[:, width // 2:] = 1
        else:
            truth[height // 2:] = 1
        seg = tiny_predictor.segment(image, labels)
        assert seg.label_map.shape == (height, width) and seg.image_size == (width, height)
        np.testing.assert_array_equal(seg.label_map, truth)  # every pixel, the boundary included
        assert seg.areas() == {"red thing": 0.5, "blue thing": 0.5} and seg.grid == (4, 4) and seg.windows == 1
        assert (seg.score > 0.5).all()  # softmax over two labels: the winner has more than half
        # A background threshold above every winner's probability leaves all pixels unlabelled.
        assert (tiny_predictor.segment(image, labels, background=0.999999).label_map == -1).all()
        # Similarity maps of the same (oracle) features against texts whose embeddings are the two classes.
        tiny_predictor.encode_texts = lambda texts, normalize=True: classes
        maps = tiny_predictor.similarity_maps(image, labels)
        assert maps.cosine.shape == maps.probs.shape == (2, height, width)
        red = truth == 0
        np.testing.assert_allclose(maps.cosine[0][red].max(), 1.0, atol=1e-5)  # the red class's own map peaks at 1
        x, y = maps.peak(0)
        assert red[y, x] and not red[maps.peak(1)[::-1]]
        assert (maps.cosine[0][red] > maps.cosine[1][red]).all() and (maps.cosine[1][~red] > maps.cosine[0][~red]).all()
        np.testing.assert_allclose(maps.probs.sum(0), 1.0, rtol=1e-5)  # CLIP: softmax over the texts per pixel
    finally:
        tiny_predictor._encode_patches = jitted
        tiny_predictor.__dict__.pop("encode_texts", None)  # the method again


def test_sliding_windows_cover_a_large_image_and_put_features_in_place(tiny_predictor):
    labels = ["red thing", "blue thing"]
    classes = tiny_predictor.class_embeddings(labels)
    jitted = tiny_predictor._encode_patches
    tiny_predictor._encode_patches = _colour_oracle(classes[0], classes[1])
    try:
        image = _halves(200, 100, vertical=True)
        # Shorter side 100 px -> a 192 x 96 resize (multiples of the 16 px patch); 64 px windows every 32 px: 5 x 2.
        seg = tiny_predictor.segment(image, labels, resolution=100)
        assert seg.windows == 10 and seg.grid == (6, 12) and seg.label_map.shape == (100, 200)
        truth = np.zeros((100, 200), np.int32)
        truth[:, 100:] = 1
        np.testing.assert_array_equal(seg.label_map, truth)
        assert tiny_predictor.segment(image, labels, resolution=100, stride=64).windows == 3 * 2
        with pytest.raises(InputError, match="stride=24 must be a multiple of the patch size 16"):
            tiny_predictor.segment(image, labels, resolution=100, stride=24)
        with pytest.raises(InputError, match="background=1.5 must be a probability"):
            tiny_predictor.segment(image, labels, background=1.5)
    finally:
        tiny_predictor._encode_patches = jitted


def test_dense_maps_of_a_trained_model_reuse_compiled_functions(predictor, tmp_path):
    """The real model: maps equal the cosine of its own dense features and text embeddings, upsampled (ops.dense,
    checked against PyTorch's bilinear in test_evaluators); repeated calls and sliding windows compile once."""
    import jax.numpy as jnp

    from harmoclip_jax.ops import dense as dense_ops

    image = _photo(7, 150, 100)
    texts = ["a red star", "a blue square", "a green cross"]
    maps = predictor.similarity_maps(image, texts)
    pixels, _ = predictor.preprocess(image)
    dense = np.asarray(predictor.model.encode_dense(jnp.asarray(pixels[None])))[0]
    want = dense_ops.upsample(dense_ops.patch_cosine(dense, predictor.encode_texts(texts)), (100, 150))
    np.testing.assert_allclose(np.moveaxis(maps.cosine, 0, -1), want, atol=2e-5)
    assert np.all((maps.probs > 0) & (maps.probs < 1))
    before = dict(predictor.trace_counts)
    predictor.similarity_maps(_photo(8, 40, 90), texts[:1])
    windowed = predictor.segment(image, LABELS, resolution=160)
    assert windowed.label_map.shape == (100, 150) and windowed.windows > predictor.batch_size  # several batches
    assert predictor.trace_counts["patches"] == before["patches"] == 1


def test_predict_cli_heatmap_and_segment_pngs(workdir, tmp_path):
    report = json.loads(_run("-m", "harmoclip_jax.predict", "--checkpoint", str(workdir), "--scene", "test:1",
                             "--heatmap", "a red star", "a blue square", cwd=tmp_path).stdout)
    assert [m["text"] for m in report["maps"]] == ["a red star", "a blue square"]
    assert report["image_size"] == [128, 128] and report["out"] == "scene_test_1_heatmap.png"
    heatmap = Image.open(tmp_path / report["out"])
    assert heatmap.width > 2.5 * heatmap.height  # three panels: the image and one per phrase
    report = json.loads(_run("-m", "harmoclip_jax.predict", "--checkpoint", str(workdir), "--scene", "test:1",
                             "--segment", "red star,blue square,green cross", "--resolution", "96", "--out", "seg.png",
                             cwd=tmp_path).stdout)
    assert report["windows"] > 1 and abs(sum(a["fraction"] for a in report["areas"]) - 1) < 1e-3
    assert Image.open(tmp_path / "seg.png").size[0] > 0
    both = _run("-m", "harmoclip_jax.predict", "--checkpoint", str(workdir), "--scene", "test:1", "--heatmap", "x",
                "--segment", "a,b", cwd=tmp_path, check=False)
    assert both.returncode == 2 and both.stderr.strip().splitlines()[-1].endswith(
        "give --heatmap or --segment, not both (one picture per run) (usage: python -m harmoclip_jax.predict --help)")

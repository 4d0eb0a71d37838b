"""grain pipelines on tiny on-disk TFDS datasets: layout, content, determinism, resume, sharding, bad records."""
import json

import grain
import numpy as np
import pytest
import tensorflow_datasets as tfds

from harmoclip_jax.data import pipeline, scenes
from harmoclip_jax.data.features import record_features
from harmoclip_jax.models.normalization import OPENAI_CLIP
from harmoclip_jax.tokenizer import tokenize

SIZE = 32  # model input size in these tests (the tiny dataset stores 64 px images)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    directory = str(tmp_path_factory.mktemp("tfds"))
    scenes.Scenes(config="tiny", data_dir=directory).download_and_prepare()
    return directory


@pytest.fixture
def config():
    config = pipeline.default_data_config()
    config.dataset = "scenes/tiny"
    config.image_size = SIZE
    config.max_regions = 3  # below the 4 objects some images have: the random subset is exercised
    config.batch_size = 8
    config.eval_batch_size = 10
    config.read_threads = 1
    return config


def _raw_source(data_dir, split):
    return tfds.data_source("scenes/tiny", split=split, data_dir=data_dir,
                            decoders={"image": tfds.decode.SkipDecoding()})


def _take(iterator, n):
    return [next(iterator) for _ in range(n)]


def _assert_batches_equal(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for key in x:
            np.testing.assert_array_equal(x[key], y[key], err_msg=key)


def test_train_batch_layout_and_content(data_dir, config):
    iterator = pipeline.make_train_iterator(config, data_dir=data_dir, process_index=0, process_count=1)
    batch = next(iterator)
    b, t, s = config.batch_size, config.max_regions, SIZE
    expected = {"image": ((b, s, s, 3), np.float32), "text": ((b, 77), np.int32), "boxes": ((b, t, 4), np.float32),
                "box_mask": ((b, t), np.bool_), "region_text": ((b, t, 77), np.int32),
                "lexeme": ((b, t, 77), np.int32), "lexeme_id": ((b, t), np.int32), "label": ((b, t), np.int32),
                "index": ((b,), np.int32), "num_bad_records": ((b,), np.int32)}
    assert {k: (v.shape, v.dtype) for k, v in batch.items()} == {k: (s_, np.dtype(d)) for k, (s_, d) in
                                                                  expected.items()}
    source = _raw_source(data_dir, "train")
    for row, record_index in enumerate(batch["index"]):
        record = source[int(record_index)]
        np.testing.assert_allclose(batch["image"][row], pipeline.decode_image(record["image"], s), atol=1e-6)
        captions = [c.decode() for c in record["captions"]]
        assert any(np.array_equal(batch["text"][row], tokens) for tokens in tokenize(captions))
        regions = record["regions"]
        n = len(regions["label"])
        mask = batch["box_mask"][row]
        assert mask.sum() == min(n, t) and mask[: mask.sum()].all()
        pixel_boxes = np.stack(regions["box"]) * s
        for slot in range(t):
            if not mask[slot]:
                assert batch["label"][row, slot] == -1 and batch["lexeme_id"][row, slot] == -1
                assert not batch["boxes"][row, slot].any() and not batch["region_text"][row, slot].any()
                continue
            # Find the record region this slot came from; all its fields must belong to that same region.
            match = np.flatnonzero(np.all(np.isclose(pixel_boxes, batch["boxes"][row, slot]), axis=1))
            assert len(match) == 1
            r = int(match[0])
            assert batch["label"][row, slot] == regions["label"][r]
            lexeme = regions["lexeme"][r].decode()
            assert batch["lexeme_id"][row, slot] == pipeline.lexeme_id(lexeme)
            np.testing.assert_array_equal(batch["lexeme"][row, slot], tokenize([lexeme])[0])
            np.testing.assert_array_equal(batch["region_text"][row, slot],
                                          tokenize([regions["caption"][r].decode()])[0])
    assert not batch["num_bad_records"].any()
    iterator.close()


def test_decode_image_squashes_and_normalises():
    from PIL import Image
    import io

    buffer = io.BytesIO()
    Image.new("RGB", (40, 20), (255, 0, 128)).save(buffer, format="PNG")
    image = pipeline.decode_image(buffer.getvalue(), 16)
    assert image.shape == (16, 16, 3) and image.dtype == np.float32
    mean, std = (np.asarray(v, np.float32) for v in OPENAI_CLIP)
    expected = (np.array([255, 0, 128]) / 255 - mean) / std
    np.testing.assert_allclose(image, np.broadcast_to(expected, (16, 16, 3)), atol=1e-5)


@pytest.mark.parametrize("size", [224, 64, 16])
def test_turbo_jpeg_decode_gives_pil_drafts_pixels_bit_for_bit(size):
    """The simplejpeg path (YCbCr and grayscale JPEGs) decodes at the DCT scale PIL's `draft` picks, to the same
    uint8 pixels; CMYK JPEGs and other formats go through PIL. Odd sizes, progressive, 4:4:4 and 4:2:0 included."""
    import io

    from PIL import Image

    from harmoclip_jax.data import images

    assert images.simplejpeg is not None, "simplejpeg (requirements.txt) is not installed"
    rng = np.random.default_rng(size)
    cases = []
    for width, height in [(640, 480), (500, 375), (333, 251), (1024, 200), (100, 80), (15, 9)]:
        pixels = (rng.random((height, width, 3)) * 80 + np.linspace(0, 170, width)[None, :, None]).astype(np.uint8)
        for mode, options, turbo in [("RGB", {}, True), ("RGB", {"progressive": True}, True), ("L", {}, True),
                                     ("RGB", {"subsampling": 0}, True), ("CMYK", {}, False)]:
            buffer = io.BytesIO()
            Image.fromarray(pixels).convert(mode).save(buffer, "JPEG", quality=90, **options)
            cases.append((f"{width}x{height} {mode} {options}", buffer.getvalue(), turbo))
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "PNG")
    cases.append(("png", buffer.getvalue(), False))
    for name, data, turbo in cases:
        assert (images._decode_jpeg_turbo(data, size) is not None) == turbo, name
        expected = images.decode_drafted_pil(data, size)
        np.testing.assert_array_equal(images.decode_drafted(data, size), expected, err_msg=name)
        np.testing.assert_array_equal(images.decode_image(data, size, dtype="uint8"),
                                      np.asarray(Image.fromarray(expected).resize((size, size), Image.BICUBIC))
                                      if expected.shape[:2] != (size, size) else expected, err_msg=name)
    corrupt = b"\xff\xd8\xff\xe0 not really a jpeg"  # PIL's own error, as before simplejpeg
    with pytest.raises(OSError) as from_pil:
        images.decode_drafted_pil(corrupt, size)
    with pytest.raises(OSError, match=str(from_pil.value)):
        images.decode_drafted(corrupt, size)


def test_lexeme_ids_are_stable_and_distinct():
    assert pipeline.lexeme_id("red circle") == pipeline.lexeme_id(b" Red  Circle ")
    assert pipeline.lexeme_id("") == -1
    ids = {pipeline.lexeme_id(name) for name in scenes.CLASS_NAMES}
    assert len(ids) == 36 and all(0 <= i < 2**31 for i in ids)


def test_train_is_deterministic_and_reshuffles_each_epoch(data_dir, config):
    kwargs = dict(data_dir=data_dir, process_index=0, process_count=1)
    epoch = 96 // config.batch_size  # tiny train has 96 records
    first = pipeline.make_train_iterator(config, seed=1, **kwargs)
    batches = _take(first, 2 * epoch)
    _assert_batches_equal(batches[:3], _take(pipeline.make_train_iterator(config, seed=1, **kwargs), 3))
    other_seed = next(pipeline.make_train_iterator(config, seed=2, **kwargs))
    assert not np.array_equal(other_seed["index"], batches[0]["index"])
    epoch_1 = np.concatenate([b["index"] for b in batches[:epoch]])
    epoch_2 = np.concatenate([b["index"] for b in batches[epoch:]])
    assert sorted(epoch_1) == sorted(epoch_2) == list(range(96))  # every record once per epoch
    assert not np.array_equal(epoch_1, epoch_2)
    # The caption is drawn per (seed, epoch, record): it changes between epochs for many records.
    text_1 = {int(i): t for b in batches[:epoch] for i, t in zip(b["index"], b["text"])}
    text_2 = {int(i): t for b in batches[epoch:] for i, t in zip(b["index"], b["text"])}
    changed = sum(not np.array_equal(text_1[i], text_2[i]) for i in range(96))
    assert changed > 96 // 2


def test_resume_from_checkpoint_gives_the_same_batches(data_dir, config):
    kwargs = dict(data_dir=data_dir, seed=3, process_index=0, process_count=1)
    original = pipeline.make_train_iterator(config, **kwargs)
    _take(original, 5)
    state = json.loads(json.dumps(original.get_state()))  # what a checkpoint stores
    expected = _take(original, 14)  # crosses the epoch boundary (12 batches per epoch)
    restored = pipeline.make_train_iterator(config, **kwargs)
    restored.set_state(state)
    _assert_batches_equal(_take(restored, 14), expected)


def _old_train_iterator(config, *, source, seed, process_index=0, process_count=1):
    """The training pipeline as it was before the global data order (per-process shard first): the reference the
    one-process stream must equal bit for bit."""
    ds = grain.MapDataset.source(source).map_with_index(pipeline.AttachIndex(len(source)))
    ds = ds[process_index::process_count]
    epoch_length = len(ds)
    ds = ds.seed(seed).shuffle().repeat(config.num_epochs)
    ds = ds.map_with_index(pipeline.TrainTransform(inputs=pipeline.ModelInputs.from_config(config),
                                                   max_regions=config.max_regions, seed=seed,
                                                   epoch_length=epoch_length))
    ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=config.read_threads,
                                              prefetch_buffer_size=config.read_buffer_size))
    ds = pipeline.SkipBadRecords(ds, config.max_bad_fraction, config.bad_check_after)
    return iter(ds.batch(config.batch_size, drop_remainder=True))


def _without_private(batch):
    return {k: v for k, v in batch.items() if not k.startswith("_")}


def test_one_process_stream_is_bitwise_the_old_one(data_dir, config):
    source = _raw_source(data_dir, "train")
    expected = [_without_private(b) for b in _take(_old_train_iterator(config, source=source, seed=7), 26)]
    new = pipeline.make_train_iterator(config, source=source, seed=7, process_index=0, process_count=1)
    _assert_batches_equal(_take(new, 26), expected)  # 12 batches per epoch: crosses two epoch boundaries
    assert new.get_state() == {"position": 26 * config.batch_size}


def test_one_process_stream_with_bad_records_is_the_old_one(corrupt_source, config):
    config.batch_size = 3
    config.max_bad_fraction = 1.0
    expected = [_without_private(b) for b in _take(_old_train_iterator(config, source=corrupt_source, seed=1), 12)]
    new = pipeline.make_train_iterator(config, source=corrupt_source, seed=1, process_index=0, process_count=1)
    got = _take(new, 12)
    _assert_batches_equal(got, expected)
    # Skipped records count in the position: it is the number of records read.
    skipped = sum(int(b["num_bad_records"].sum()) for b in got)  # (an upper bound: repaired ones count too)
    assert 12 * 3 < new.get_state()["position"] <= 12 * 3 + skipped
    resumed = pipeline.make_train_iterator(config, source=corrupt_source, seed=1, process_index=0, process_count=1,
                                           position=new.get_state()["position"])
    _assert_batches_equal(_take(resumed, 3), _take(new, 3))


def _global_batches(config, process_count, steps, position=0, **kwargs):
    """The global batches of `process_count` processes (local batches concatenated) and their end position."""
    config = config.copy_and_resolve_references()
    config.batch_size //= process_count
    iterators = [pipeline.make_train_iterator(config, process_index=p, process_count=process_count, position=position,
                                              **kwargs) for p in range(process_count)]
    batches = [{k: np.concatenate([b[k] for b in local]) for k in local[0]}
               for local in zip(*(_take(it, steps) for it in iterators))]
    positions = {it.get_state()["position"] for it in iterators}
    for it in iterators:
        it.close()
    assert len(positions) == 1  # one number, the same on every process
    return batches, positions.pop()


def test_global_batches_do_not_depend_on_the_process_count(data_dir, config):
    kwargs = dict(source=_raw_source(data_dir, "train"), seed=2)
    one, end = _global_batches(config, 1, 14, **kwargs)
    assert end == 14 * 8
    for count in (2, 4):
        _assert_batches_equal(_global_batches(config, count, 14, **kwargs)[0], one)
    # A position written by 2 processes resumes on 1 and on 4 with the same global batches, and back.
    first, position = _global_batches(config, 2, 5, **kwargs)
    _assert_batches_equal(first, one[:5])
    _assert_batches_equal(_global_batches(config, 1, 9, position=position, **kwargs)[0], one[5:])
    _assert_batches_equal(_global_batches(config, 4, 9, position=position, **kwargs)[0], one[5:])


def test_bad_records_are_replaced_in_the_global_order_with_several_processes(corrupt_source, config, caplog):
    config.batch_size = 4
    config.max_bad_fraction = 1.0
    kwargs = dict(source=corrupt_source, seed=3)
    two, end = _global_batches(config, 2, 8, **kwargs)
    assert end == 8 * 4
    _assert_batches_equal(_global_batches(config, 4, 8, **kwargs)[0], two)
    middle, position = _global_batches(config, 4, 3, **kwargs)
    _assert_batches_equal(middle + _global_batches(config, 2, 5, position=position, **kwargs)[0], two)
    damage = {i: corrupt_source[i]["image_id"] % 6 for i in range(24)}
    indices = np.concatenate([b["index"] for b in two])
    assert not any(damage[int(i)] in (UNDECODABLE, NO_CAPTIONS) for i in indices)
    assert sum(int(b["num_bad_records"].sum()) for b in two) > 0 and "undecodable image" in caplog.text


def test_train_shards_are_disjoint_and_cover_the_split(data_dir, config):
    config.num_epochs = 1
    config.batch_size = 1
    seen = []
    for process in range(3):
        iterator = pipeline.make_train_iterator(config, data_dir=data_dir, process_index=process, process_count=3)
        seen.append({int(b["index"][0]) for b in iterator})
        assert len(seen[-1]) == 32
    assert not (seen[0] & seen[1] or seen[0] & seen[2] or seen[1] & seen[2])
    assert set().union(*seen) == set(range(96))


@pytest.mark.parametrize("process_count", [1, 5])
def test_eval_yields_every_record_once_with_padding(data_dir, config, process_count):
    source = _raw_source(data_dir, "val")
    per_process, indices = [], []
    for process in range(process_count):
        batches = list(pipeline.make_eval_iterator(config, split="val", data_dir=data_dir, process_index=process,
                                                   process_count=process_count))
        per_process.append(len(batches))
        assert len(batches) == pipeline.num_eval_batches(config, len(source), process_count)
        for batch in batches:
            assert batch["image"].shape == (10, SIZE, SIZE, 3) and batch["captions"].shape == (10, 5, 77)
            assert batch["boxes"].shape == (10, config.eval_max_regions, 4)
            padding = ~batch["mask"]
            assert (batch["index"][padding] == -1).all() and not batch["image"][padding].any()
            assert not batch["caption_mask"][padding].any() and not batch["box_mask"][padding].any()
            indices += batch["index"][batch["mask"]].tolist()
    assert len(set(per_process)) == 1  # every process runs the same number of eval steps
    assert sorted(indices) == list(range(len(source)))  # every record exactly once
    if process_count == 1:
        assert per_process == [8]  # 72 records, batches of 10: the last one has 2 records and 8 padding


def test_eval_carries_all_captions_and_regions(data_dir, config):
    batch = next(pipeline.make_eval_iterator(config, split="test", data_dir=data_dir, process_index=0,
                                             process_count=1))
    source = _raw_source(data_dir, "test")
    for row, record_index in enumerate(batch["index"]):
        record = source[int(record_index)]
        np.testing.assert_array_equal(batch["captions"][row], tokenize([c.decode() for c in record["captions"]]))
        assert batch["caption_mask"][row].all()
        n = len(record["regions"]["label"])
        assert batch["box_mask"][row].sum() == n  # eval keeps all regions (here 2-4 > max_regions=3 for train)
        np.testing.assert_allclose(batch["boxes"][row, :n], np.stack(record["regions"]["box"]) * SIZE, rtol=1e-6)
        np.testing.assert_array_equal(batch["label"][row, :n], record["regions"]["label"])


# ------------------------------------------------------------------------------------------- bad records

GOOD, UNDECODABLE, BOX_OUTSIDE, ZERO_AREA, EMPTY_CAPTION, NO_CAPTIONS = range(6)


class CorruptScenes(tfds.core.GeneratorBasedBuilder):
    """Scenes records with one kind of damage per record index (mod 6); index % 6 == 0 stays good."""

    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
        return tfds.core.DatasetInfo(builder=self, features=record_features("jpeg"))

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples()}

    def _generate_examples(self):
        for index in range(24):
            record = scenes.scene_record(scenes.generate_example(0, "train", index, 32), "train", index)
            boxes = record["regions"]["box"].copy()
            damage = index % 6
            if damage == UNDECODABLE:
                record["image"] = b"\xff\xd8\xff this is not a jpeg"
            elif damage == BOX_OUTSIDE:
                boxes[0] = [0.5, 0.5, 1.7, 0.9]
            elif damage == ZERO_AREA:
                boxes[0] = [0.2, 0.3, 0.2, 0.6]
            elif damage == EMPTY_CAPTION:
                record["captions"][2] = ""
            elif damage == NO_CAPTIONS:
                record["captions"] = ["", " "]
            record["regions"]["box"] = boxes
            yield index, record


@pytest.fixture(scope="module")
def corrupt_source(tmp_path_factory):
    directory = str(tmp_path_factory.mktemp("corrupt"))
    CorruptScenes(data_dir=directory, file_format="array_record").download_and_prepare()
    return pipeline.open_source("corrupt_scenes", "train", directory)  # a prepared (not generated) dataset


def test_unprepared_dataset_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="not prepared .* harmoclip_jax.data.prepare"):
        pipeline.open_source("coco_retrieval", "val", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="unknown dataset 'no_such_set'"):
        pipeline.open_source("no_such_set", "val", str(tmp_path))


def test_train_repairs_or_skips_bad_records_and_counts_them(corrupt_source, config, caplog):
    config.num_epochs = 1
    config.batch_size = 1
    config.max_bad_fraction = 1.0  # never stop: this test looks at what is repaired and skipped
    batches = list(pipeline.make_train_iterator(config, source=corrupt_source, process_index=0, process_count=1))
    by_index = {int(b["index"][0]): b for b in batches}
    # TFDS stores records in key-hash order: the damage kind follows image_id, not the record index.
    damage = {i: corrupt_source[i]["image_id"] % 6 for i in range(24)}
    skipped = {i for i in range(24) if damage[i] in (UNDECODABLE, NO_CAPTIONS)}
    assert set(by_index) == set(range(24)) - skipped
    assert sum(int(b["num_bad_records"].sum()) for b in batches) == 20  # all but the 4 good records
    for index, batch in by_index.items():
        n = len(corrupt_source[index]["regions"]["label"])
        dropped = damage[index] in (BOX_OUTSIDE, ZERO_AREA)  # the broken box is removed, the record kept
        assert batch["box_mask"].sum() == min(n - dropped, config.max_regions)
        assert (batch["boxes"] <= SIZE).all() and (batch["boxes"] >= 0).all()
        assert batch["text"][0, 1] != 49407  # never the empty caption
    assert "undecodable image" in caplog.text and "outside the image" in caplog.text


def test_train_stops_past_the_bad_fraction(corrupt_source, config):
    config.batch_size = 2
    config.max_bad_fraction = 0.5
    config.bad_check_after = 6
    iterator = pipeline.make_train_iterator(config, source=corrupt_source, process_index=0, process_count=1)
    # The message ends with the config field to raise; grain may append a note on the next line.
    message = r"of the \d+ training records .*max_bad_fraction=0\.5.*raise config\.data\.max_bad_fraction\.(\n|$)"
    with pytest.raises(pipeline.BadRecordsError, match=message):
        _take(iterator, 12)


@pytest.mark.parametrize("damage,message", [
    (UNDECODABLE, "undecodable image"), (BOX_OUTSIDE, "outside the image"), (ZERO_AREA, "zero or negative area"),
    (EMPTY_CAPTION, "empty caption"),
])
def test_eval_fails_naming_the_bad_record(corrupt_source, config, damage, message):
    source = [corrupt_source[i] for i in range(len(corrupt_source))]
    good = [r for r in source if r["image_id"] % 6 == GOOD]  # (records are stored in key-hash order)
    bad = next(r for r in source if r["image_id"] % 6 == damage)
    with pytest.raises(pipeline.BadRecordError, match=rf"record 2 \(image_id={bad['image_id']}.*{message}"):
        list(pipeline.make_eval_iterator(config, source=good[:2] + [bad], process_index=0, process_count=1))


def test_eval_rejects_more_regions_than_it_can_hold(data_dir, config):
    config.eval_max_regions = 2
    message = r"eval_max_regions=2 .*; raise config\.data\.eval_max_regions\. "
    with pytest.raises(pipeline.BadRecordError, match=message):
        list(pipeline.make_eval_iterator(config, split="val", data_dir=data_dir, process_index=0, process_count=1))


# ------------------------------------------------------------------------------------------ multiprocessing


@pytest.mark.slow
def test_two_workers_produce_valid_batches_and_resume(data_dir, config):
    config.num_workers = 2
    kwargs = dict(data_dir=data_dir, seed=5, process_index=0, process_count=1)
    iterator = pipeline.make_train_iterator(config, **kwargs)
    try:
        first = _take(iterator, 2)
        state = iterator.get_state()
        expected = _take(iterator, 2)
    finally:
        iterator.close()
    indices = np.concatenate([b["index"] for b in first + expected])
    assert len(set(indices.tolist())) == len(indices)  # no record twice within an epoch
    config.num_workers = 0  # workers do not change the batches
    _assert_batches_equal(_take(pipeline.make_train_iterator(config, **kwargs), 4), first + expected)
    assert first[0]["image"].shape == (8, SIZE, SIZE, 3)
    restored = pipeline.make_train_iterator(config, **kwargs)
    try:
        restored.set_state(state)
        _assert_batches_equal(_take(restored, 2), expected)
    finally:
        restored.close()


def test_iterator_state_round_trips_through_an_orbax_checkpoint(data_dir, config, tmp_path):
    import orbax.checkpoint as ocp

    kwargs = dict(data_dir=data_dir, seed=4, process_index=0, process_count=1)
    original = pipeline.make_train_iterator(config, **kwargs)
    _take(original, 3)
    with ocp.CheckpointManager(tmp_path / "ckpt") as manager:
        manager.save(3, args=ocp.args.Composite(data=ocp.args.JsonSave(original.get_state())))
        manager.wait_until_finished()
        expected = _take(original, 2)
        restored = pipeline.make_train_iterator(config, **kwargs)
        restored.set_state(manager.restore(3, args=ocp.args.Composite(data=ocp.args.JsonRestore()))["data"])
    _assert_batches_equal(_take(restored, 2), expected)


def test_old_one_process_grain_checkpoint_restores_its_data_position(data_dir, config, tmp_path):
    """Checkpoints written before the global data position held one grain iterator state per process."""
    import jax
    import orbax.checkpoint as ocp

    from harmoclip_jax import checkpoint

    source = _raw_source(data_dir, "train")
    old = _old_train_iterator(config, source=source, seed=6)
    _take(old, 3)
    state = {"x": np.arange(3.0)}
    with ocp.CheckpointManager(tmp_path / "ckpt", item_names=("state", "data_iter")) as manager:
        manager.save(3, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                data_iter=grain.checkpoint.CheckpointSave(old)))
        manager.wait_until_finished()
    expected = [_without_private(b) for b in _take(old, 2)]
    sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    abstract = {"x": jax.ShapeDtypeStruct((3,), np.float64, sharding=sharding)}
    for process_count in (1, 2):  # the old one-process position resumes on any process count
        iterators = [pipeline.make_train_iterator(config, source=source, seed=6, process_index=p,
                                                  process_count=process_count) for p in range(process_count)]
        ckpt = checkpoint.TrainCheckpointer(tmp_path / "ckpt", async_save=False)
        for it in iterators:
            restored = ckpt.restore(3, abstract, it)
        ckpt.close()
        np.testing.assert_array_equal(restored["x"], state["x"])
        assert iterators[0].get_state() == {"position": 3 * config.batch_size}
        if process_count == 1:
            _assert_batches_equal(_take(iterators[0], 2), expected)


def test_train_stops_past_the_bad_fraction_with_several_processes(corrupt_source, config):
    config.batch_size = 2
    config.max_bad_fraction = 0.5
    config.bad_check_after = 6
    iterator = pipeline.make_train_iterator(config, source=corrupt_source, process_index=1, process_count=2)
    with pytest.raises(pipeline.BadRecordsError, match=r"max_bad_fraction=0\.5.*raise config\.data\.max_bad_fraction"):
        _take(iterator, 12)


def test_uint8_images_are_the_raw_pixels_of_the_float_path(tmp_path):
    """image_dtype="uint8" batches hold the squashed pixels whose host normalisation is the float32 batch."""
    from harmoclip_jax.models.normalization import OPENAI_CLIP, normalize_pixels

    record = scenes.scene_record(scenes.generate_example(0, "train", 3, 96), "train", 3)
    as_float = pipeline.decode_image(record["image"], 64)
    as_uint8 = pipeline.decode_image(record["image"], 64, dtype="uint8")
    assert as_uint8.dtype == np.uint8 and as_uint8.shape == (64, 64, 3)
    np.testing.assert_array_equal(normalize_pixels(as_uint8, *OPENAI_CLIP), as_float)
    with pytest.raises(ValueError, match="image dtype 'float16'"):
        pipeline.decode_image(record["image"], 64, dtype="float16")
    config = pipeline.default_data_config()
    config.dataset, config.image_size, config.batch_size = "scenes/tiny", 32, 4
    config.image_dtype = "uint8"
    iterator = pipeline.make_train_iterator(config, data_dir=str(tmp_path), process_index=0, process_count=1)
    try:
        batch = next(iterator)
    finally:
        iterator.close()
    assert batch["image"].dtype == np.uint8 and batch["image"].shape == (4, 32, 32, 3)

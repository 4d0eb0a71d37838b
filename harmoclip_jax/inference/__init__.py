"""Inference with a trained or converted model: label image regions, encode images / texts / regions, retrieve.

    from harmoclip_jax.inference import Predictor

    predictor = Predictor.from_checkpoint("workdirs/demo")       # a training workdir, params export or HF dir
    result = predictor.classify_regions("photo.jpg", [[10, 20, 200, 240]], ["cat", "dog"])
    print(result.top_k[0].labels, result.top_k[0].scores)
    maps = predictor.similarity_maps("photo.jpg", ["a red car", "a bicycle"])    # (2, H, W) at the photo's size
    labels = predictor.segment("photo.jpg", ["car", "road", "sky"]).label_map     # (H, W) label indices

`predictor.py` holds the `Predictor` and its results, `inputs.py` the checks of what users pass (images, boxes,
labels; every problem an `InputError` that says the fix), `drawing.py` the pictures of box labels, similarity
maps and label maps.
"""
from harmoclip_jax.inference.drawing import draw_regions, draw_segmentation, draw_similarity_maps
from harmoclip_jax.inference.inputs import (BOX_FORMATS, IMAGE_EXTENSIONS, ImageInput, InputError, check_boxes,
                                            check_labels, check_texts, list_images, load_pil_image,
                                            model_input_boxes, parse_boxes, read_image)
from harmoclip_jax.inference.predictor import (Predictor, RegionClassification, RegionPrediction, RetrievalResult,
                                               Segmentation, SimilarityMaps, default_region_config)

__all__ = ["BOX_FORMATS", "IMAGE_EXTENSIONS", "ImageInput", "InputError", "Predictor", "RegionClassification",
           "RegionPrediction", "RetrievalResult", "Segmentation", "SimilarityMaps", "check_boxes", "check_labels",
           "check_texts", "default_region_config", "draw_regions", "draw_segmentation", "draw_similarity_maps",
           "list_images", "load_pil_image", "model_input_boxes", "parse_boxes", "read_image"]

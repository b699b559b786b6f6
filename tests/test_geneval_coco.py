"""GenEval's COCO path on tiny offline models: transformers Mask2Former with mmdet's post-processing, the CLIP
colour classifier (GenEval's templates and crop), and detections flowing through the same official rules."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from evals.detectors import (
    COLOR_TEMPLATES,
    GENEVAL_COLORS,
    CLIPColorClassifier,
    Detection,
    HFMask2FormerDetector,
    coco_object_names,
)


@pytest.fixture(scope="module")
def mask2former():
    from transformers import (
        Mask2FormerConfig,
        Mask2FormerForUniversalSegmentation,
        Mask2FormerImageProcessor,
        SwinConfig,
    )

    swin = SwinConfig(image_size=64, patch_size=4, embed_dim=16, depths=[1, 1, 1, 1], num_heads=[1, 1, 1, 2],
                      window_size=4, out_features=["stage1", "stage2", "stage3", "stage4"])
    cfg = Mask2FormerConfig(backbone_config=swin, num_labels=80, hidden_dim=32, num_queries=10, encoder_layers=1,
                            decoder_layers=2, feature_size=32, mask_feature_size=32, dim_feedforward=64,
                            encoder_feedforward_dim=64, num_attention_heads=2, common_stride=4)
    torch.manual_seed(0)
    return Mask2FormerForUniversalSegmentation(cfg).eval(), Mask2FormerImageProcessor(size={"height": 64,
                                                                                             "width": 64})


class TinyClipProcessor:
    """CLIP's processor surface the classifier uses: ``.tokenizer(texts)`` and ``(images=...)``."""

    def __init__(self, tokenizer, image_processor) -> None:
        self.tokenizer, self.image_processor = tokenizer, image_processor

    def __call__(self, images, return_tensors: str = "pt"):
        return self.image_processor(images=images, return_tensors=return_tensors)


@pytest.fixture(scope="module")
def tiny_clip():
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, PreTrainedTokenizerFast

    words = ["<pad>", "<bos>", "<eos>", "<unk>", "a", "photo", "of", "object", "-colored", *GENEVAL_COLORS,
             *{w for name in coco_object_names() for w in name.split()}]
    tk = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(),
                                                pre_tokenizers.Split("-colored", behavior="isolated")])
    tk.post_processor = processors.TemplateProcessing(single="<bos> $A <eos>", special_tokens=[("<bos>", 1),
                                                                                            ("<eos>", 2)])
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>",
                                  unk_token="<unk>")
    cfg = CLIPConfig(text_config={"vocab_size": len(words), "hidden_size": 32, "intermediate_size": 64,
                                  "num_hidden_layers": 1, "num_attention_heads": 2, "max_position_embeddings": 16,
                                  "eos_token_id": 2, "bos_token_id": 1, "pad_token_id": 0},
                     vision_config={"image_size": 32, "patch_size": 8, "hidden_size": 32, "intermediate_size": 64,
                                    "num_hidden_layers": 1, "num_attention_heads": 2}, projection_dim=16)
    torch.manual_seed(0)
    model = CLIPModel(cfg).eval()
    return model, TinyClipProcessor(tok, CLIPImageProcessor(size={"shortest_edge": 32},
                                                            crop_size={"height": 32, "width": 32}))


def clip_colors(tiny_clip) -> CLIPColorClassifier:
    return CLIPColorClassifier(model=tiny_clip[0], processor=tiny_clip[1], device="cpu")


def test_mask2former_detections_follow_mmdet_post_processing(mask2former, tiny_clip) -> None:
    model, proc = mask2former
    det = HFMask2FormerDetector(model=model, processor=proc, color_classifier=clip_colors(tiny_clip),
                                max_per_image=20, device="cpu")
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8))
    dets = det.detect(image)
    assert 0 < len(dets) <= 20 and all(d.cls in coco_object_names() for d in dets)
    # reference for the best (query, class): class prob x mean sigmoid inside its mask, box = mask bbox (+1)
    inputs = proc(images=[image], return_tensors="pt")
    with torch.no_grad():
        out = model(**inputs)
    probs = out.class_queries_logits[0].softmax(-1)[:, :-1]
    q, c = divmod(int(probs.flatten().argmax()), probs.shape[1])
    logit = torch.nn.functional.interpolate(out.masks_queries_logits[0, q][None, None], size=(64, 64),
                                            mode="bilinear", align_corners=False)
    logit = torch.nn.functional.interpolate(logit, size=(40, 48), mode="bilinear", align_corners=False)[0, 0]
    mask = (logit > 0).numpy()
    ref_score = float(probs[q, c] * logit.sigmoid()[logit > 0].mean())
    best = [d for d in dets if d.cls == coco_object_names()[c] and np.array_equal(d.mask, mask)]
    assert best and best[0].score == pytest.approx(ref_score, rel=1e-4)
    ys, xs = np.nonzero(mask)
    assert best[0].box == (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)
    colors = det.classify_colors(image, dets[:3], dets[0].cls)
    assert len(colors) == 3 and set(colors) <= set(GENEVAL_COLORS)


def test_clip_colour_classifier_crop_and_templates(tiny_clip) -> None:
    model, proc = tiny_clip
    clf = CLIPColorClassifier(model=model, processor=proc, device="cpu")
    image = Image.new("RGB", (20, 20), (200, 10, 10))
    mask = np.zeros((20, 20), dtype=bool)
    mask[5:10, 5:10] = True
    d = Detection("apple", (4.0, 4.0, 12.0, 12.0), 0.9, mask)
    crop = np.asarray(clf.crop(image, d))
    assert crop.shape == (8, 8, 3)
    assert tuple(crop[0, 0]) == (153, 153, 153) and tuple(crop[3, 3]) == (200, 10, 10)  # #999 outside the mask
    # reference: mean of the 3 normalised template embeddings per colour, renormalised; argmax cosine
    texts = [t.format(c=c, cls="apple") for c in GENEVAL_COLORS for t in COLOR_TEMPLATES]
    with torch.no_grad():
        emb = model.get_text_features(**proc.tokenizer(texts, padding=True, return_tensors="pt")).pooler_output
        img = model.get_image_features(**proc(images=[clf.crop(image, d)])).pooler_output
    emb = torch.nn.functional.normalize(emb, dim=-1).view(10, 3, -1).mean(1)
    w = torch.nn.functional.normalize(emb, dim=-1)
    expect = GENEVAL_COLORS[int((torch.nn.functional.normalize(img, dim=-1) @ w.T).argmax())]
    assert clf(image, [d], "apple") == [expect]
    assert clf(image, [], "apple") == []


def test_official_prompts_through_the_rules_with_the_coco_backend(mask2former, tiny_clip, tmp_path: Path) -> None:
    from evals.geneval import evaluate_folder, read_metadata_lines

    meta = read_metadata_lines(Path(__file__).resolve().parents[1] / "evals/data/geneval/evaluation_metadata.jsonl")
    assert len(meta) == 553
    picked = [next(m for m in meta if m["tag"] == t) for t in ("single_object", "colors", "position")]
    rng = np.random.default_rng(1)
    for i, m in enumerate(picked):
        folder = tmp_path / "imgs" / f"{i:05d}"
        (folder / "samples").mkdir(parents=True)
        (folder / "metadata.jsonl").write_text(json.dumps(m))
        Image.fromarray(rng.integers(0, 255, (48, 48, 3), dtype=np.uint8)).save(folder / "samples" / "00000.png")
    model, proc = mask2former
    backend = HFMask2FormerDetector(model=model, processor=proc, color_classifier=clip_colors(tiny_clip),
                                    device="cpu")
    rows, summary = evaluate_folder(tmp_path / "imgs", detector=backend, out_dir=tmp_path / "out")
    assert len(rows) == 3 and summary["images"] is not None
    assert set(summary["tasks"]) == {"single_object", "colors", "position"}
    assert (tmp_path / "out" / "results.jsonl").is_file()

"""llm_adapters.loss: the video-row loss is the full-vocabulary cross-entropy restricted to the video rows and
renormalised (value and gradients), text targets scored in chunks equal the full-vocabulary CE, and the trainer's
normalisation (gradient accumulation) is the HF Trainer's own.

References are computed here from the model's ordinary full logits (no llm_adapters.loss code in them).
"""
from __future__ import annotations

import pytest
import torch

from llm_fixtures import (FAMILIES, LOGIT_RTOL, MODEL_VARIANT_IDS, MODEL_VARIANTS, larp_tiny, perturb_, tiny_llm,
                          video_batch)

LORA = dict(r=4, lora_alpha=8, lora_dropout=0.0)


def trained_like(arch: str = "llama", tied: bool = False, extra: int = 0, adapter: str = "codebook"):
    """A tiny VideoLLM whose LoRA and adapter parameters are perturbed (LoRA B and the head scale start at 0)."""
    from llm_adapters.model import extend_llm

    model, tokenizer = tiny_llm(arch, tied, extra)
    video_llm = extend_llm(model, tokenizer, larp_tiny(), adapter=adapter, lora=LORA)
    perturb_([p for p in video_llm.model.parameters() if p.requires_grad], scale=0.5, seed=3)
    video_llm.model.eval()  # dropout off (LoRA dropout is 0 anyway); grad stays enabled
    return video_llm


def reference_sums(logits: torch.Tensor, labels: torch.Tensor, rows: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """From full logits (B, L, V): (CE summed over every target, restricted + renormalised to `rows` for targets in
    `rows` and full-vocabulary for the others; CE summed over the code targets; top-1 hits among `rows` there)."""
    logits, targets = logits[:, :-1].float(), labels[:, 1:]  # (B, L-1, V), (B, L-1)
    valid = targets != -100
    in_rows = valid & torch.isin(targets, rows)
    full_ce = -logits.log_softmax(-1).gather(-1, targets.clamp_min(0)[..., None])[..., 0]  # (B, L-1)
    restricted = logits[..., rows]  # (B, L-1, R)
    row_ce = restricted.logsumexp(-1) - logits.gather(-1, targets.clamp_min(0)[..., None])[..., 0]  # (B, L-1)
    ce = torch.where(in_rows, row_ce, full_ce)
    codes = in_rows & (targets != rows[0])  # rows[0] is <|video_end|>
    hits = (rows[restricted.argmax(-1)] == targets) & codes
    return ce[valid].sum(), ce[codes].sum().detach(), hits.sum()


def grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    out = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return out


def assert_grads_close(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert actual.keys() == expected.keys() and len(expected) > 4
    for name, want in expected.items():  # fp32 sums in another order: within 1e-4 of the tensor's scale
        scale = float(want.abs().max())
        assert scale > 0, name
        torch.testing.assert_close(actual[name], want, atol=1e-4 * scale, rtol=0, msg=name)


@pytest.mark.parametrize("arch,tied,extra", MODEL_VARIANTS, ids=MODEL_VARIANT_IDS)
def test_video_rows_loss_is_the_restricted_full_vocabulary_ce(arch, tied, extra, one_thread):
    from llm_adapters.loss import VideoLoss, row_scoring_error, video_row_ids

    video_llm = trained_like(arch, tied, extra)
    model, vocab = video_llm.model, video_llm.vocab
    ids, labels = video_batch(video_llm.tokenizer, vocab)  # (1, L): two prompts, 2 x (32 codes + end)
    rows = video_row_ids(vocab)
    assert rows.tolist() == [vocab.video_end_id, *range(vocab.video_offset, vocab.vocab_size)]

    terms, outputs = VideoLoss(model, vocab)(model, {"input_ids": ids, "labels": labels})
    assert outputs.logits.shape == (1, ids.shape[1], vocab.codebook_size + 1)  # never the full vocabulary
    (terms.loss_sum / terms.num_targets).backward()
    mine = grads(model)

    want, want_codes, want_hits = reference_sums(model(input_ids=ids).logits, labels, rows)
    (want / (labels[:, 1:] != -100).sum()).backward()
    reference = grads(model)
    assert int(terms.num_targets) == 2 * (vocab.num_video_tokens + 1) and int(terms.num_codes) == 64
    assert float(terms.loss_sum.detach()) == pytest.approx(float(want.detach()), rel=1e-5)
    assert float(terms.code_loss_sum) == pytest.approx(float(want_codes), rel=1e-5)
    assert int(terms.code_correct) == int(want_hits)
    assert_grads_close(mine, reference)
    assert any("video.rows" in n for n in mine) and any("lora_B" in n for n in mine)

    # the full-vocabulary CE is a different number: the text rows hold probability mass
    full, _ = VideoLoss(model, vocab, mode="full")(model, {"input_ids": ids, "labels": labels})
    assert float(full.loss_sum.detach()) > float(terms.loss_sum.detach()) + 1.0
    error = row_scoring_error(model, vocab, ids)  # both narrow paths = the model's own logits
    assert error.rows <= LOGIT_RTOL * error.scale and error.text <= LOGIT_RTOL * error.scale


def test_text_targets_in_chunks_equal_the_full_vocabulary_ce(one_thread):
    """Prompt tokens as targets too (text answers): full-vocabulary CE in chunks of 5 positions, recomputed in
    backward; value and gradients equal the reference from the full logits."""
    from llm_adapters.loss import VideoLoss, video_row_ids

    video_llm = trained_like("qwen2", True, 37)
    model, vocab = video_llm.model, video_llm.vocab
    ids, labels = video_batch(video_llm.tokenizer, vocab)
    labels = torch.where(labels == -100, ids, labels)  # every prompt token becomes a text target
    labels[0, 0] = -100
    text_targets = int(((labels[:, 1:] != -100) & (labels[:, 1:] < vocab.base)).sum())
    assert text_targets > 20

    loss = VideoLoss(model, vocab, text_chunk=5)
    terms, _ = loss(model, {"input_ids": ids, "labels": labels})
    assert loss._transform_checked  # the post-head transform was checked against the model's forward
    terms.loss_sum.backward()
    mine = grads(model)
    want, want_codes, _ = reference_sums(model(input_ids=ids).logits, labels, video_row_ids(vocab))
    want.backward()
    assert float(terms.loss_sum.detach()) == pytest.approx(float(want.detach()), rel=1e-5)
    assert float(terms.code_loss_sum) == pytest.approx(float(want_codes), rel=1e-5)
    assert_grads_close(mine, grads(model))


def test_an_unknown_post_head_transform_is_refused(one_thread):
    """A soft-capping the text path would apply but the model's forward does not (Llama ignores the key): the
    check measures the difference and VideoLoss refuses to score text targets with it."""
    from llm_adapters.loss import VideoLoss, row_scoring_error

    video_llm = trained_like("llama")
    model, vocab = video_llm.model, video_llm.vocab
    model.config.final_logit_softcapping = 2.0
    ids, labels = video_batch(video_llm.tokenizer, vocab)
    error = row_scoring_error(model, vocab, ids)
    assert error.rows <= LOGIT_RTOL * error.scale and error.text > 0.1 * error.scale
    labels = torch.where(labels == -100, ids, labels)
    with pytest.raises(RuntimeError, match="LlamaForCausalLM.*logit_transform.*video_loss='full'"):
        VideoLoss(model, vocab)(model, {"input_ids": ids, "labels": labels})
    terms, _ = VideoLoss(model, vocab)(model, {"input_ids": ids, "labels": video_batch(video_llm.tokenizer, vocab)[1]})
    assert int(terms.num_codes) == 64  # without text targets nothing needs the transform


def test_rows_adapter_falls_back_to_keeping_columns(one_thread):
    """The "rows" adapter (peft trainable tokens on a resized lm_head, no HybridHead): same loss and gradients."""
    from llm_adapters.loss import VideoLoss, video_row_ids

    video_llm = trained_like("llama", False, 0, adapter="rows")
    model, vocab = video_llm.model, video_llm.vocab
    ids, labels = video_batch(video_llm.tokenizer, vocab)
    terms, outputs = VideoLoss(model, vocab)(model, {"input_ids": ids, "labels": labels})
    assert outputs.logits.shape[-1] == vocab.codebook_size + 1
    terms.loss_sum.backward()
    mine = grads(model)
    want, _, _ = reference_sums(model(input_ids=ids).logits, labels, video_row_ids(vocab))
    want.backward()
    assert float(terms.loss_sum.detach()) == pytest.approx(float(want.detach()), rel=1e-5)
    assert any("trainable_tokens" in n for n in mine)
    assert_grads_close(mine, grads(model))


def test_score_rows_restores_the_head_and_checks_ids():
    from llm_adapters.adapter import hf_model
    from llm_adapters.loss import score_rows, video_row_ids

    video_llm = trained_like("llama")
    head = hf_model(video_llm.model).get_output_embeddings()
    ids, _ = video_batch(video_llm.tokenizer, video_llm.vocab)
    with torch.no_grad():
        full = video_llm.model(input_ids=ids).logits
        with score_rows(head, video_row_ids(video_llm.vocab)) as scoring:
            video_llm.model(input_ids=ids)
        assert scoring.hidden.shape == (*ids.shape, head.in_features)
        assert torch.equal(video_llm.model(input_ids=ids).logits, full)  # back to the full head, no hook left
    with pytest.raises(ValueError, match="new ids"):
        with score_rows(head, torch.tensor([0, video_llm.vocab.video_end_id])):
            pass
    assert head.scored_rows is None and not head._forward_hooks


@pytest.mark.parametrize("mode", ["full", "video_rows"])
def test_trainer_normalisation_under_gradient_accumulation_is_the_hf_trainers(tmp_path, mode, one_thread):
    """Two micro-batches with different target counts, accumulated: VideoLLMTrainer.training_step gives the loss and
    gradients of the stock HF Trainer (its model's built-in loss for "full"; for "video_rows" the restricted CE as a
    `compute_loss_func`, which the Trainer normalises with the same num_items_in_batch)."""
    from transformers import Trainer, TrainingArguments

    from llm_adapters.loss import video_row_ids
    from llm_adapters.train import VideoLLMTrainer

    video_llm = trained_like("llama")
    model, vocab = video_llm.model, video_llm.vocab
    ids, labels = video_batch(video_llm.tokenizer, vocab)
    short = labels.clone()
    short[:, : ids.shape[1] // 2] = -100  # the second micro-batch: fewer targets
    batches = [{"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels},
               {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": short}]
    args = TrainingArguments(output_dir=str(tmp_path), gradient_accumulation_steps=2, per_device_train_batch_size=1,
                             use_cpu=True, report_to=[], label_names=["labels"])

    def restricted(outputs, labels, num_items_in_batch):  # noqa: ANN001
        return reference_sums(outputs.logits, labels, video_row_ids(vocab))[0] / num_items_in_batch

    stock = Trainer(model=model, args=args, compute_loss_func=restricted if mode == "video_rows" else None)
    ours = VideoLLMTrainer(model=model, args=args, video_llm=video_llm, run_config={}, video_loss=mode)

    def accumulate(trainer: Trainer) -> tuple[list[float], dict[str, torch.Tensor]]:
        count = trainer._get_num_items_in_batch(batches, torch.device("cpu"))
        assert int(count) == int(sum((b["labels"][:, 1:] != -100).sum() for b in batches))
        losses = [float(trainer.training_step(model, dict(b), count)) for b in batches]
        return losses, grads(model)

    want_losses, want_grads = accumulate(stock)
    losses, mine = accumulate(ours)
    assert losses == pytest.approx(want_losses, rel=1e-5)
    assert_grads_close(mine, want_grads)
    assert len(ours._video_stats) == 2  # per-micro-batch code figures from the same forward
    stats = torch.stack(ours._video_stats).sum(0)
    assert int(stats[2]) == 64 + int(vocab.is_video_id(short).sum())
    # without num_items_in_batch: the mean over the micro-batch's targets, as the built-in loss
    mean = float(ours.compute_loss(model, dict(batches[1])).detach())
    assert mean == pytest.approx(want_losses[1] * int(sum((b["labels"][:, 1:] != -100).sum() for b in batches))
                                 / int((short[:, 1:] != -100).sum()), rel=1e-5)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_both_narrow_paths_match_the_models_logits_for_every_family(family, one_thread):
    """Row scoring and the chunked text path equal the model's own logits, post-head transforms included (Gemma 2/3
    soft-capping, Cohere logit_scale, Granite logits_scaling), and the trainer's transform check accepts them."""
    from llm_fixtures import family_llm

    from llm_adapters.loss import VideoLoss, row_scoring_error
    from llm_adapters.model import extend_llm

    model, tokenizer = family_llm(family)
    video_llm = extend_llm(model, tokenizer, larp_tiny(), lora=LORA)
    perturb_([p for p in video_llm.model.parameters() if p.requires_grad], scale=0.5, seed=3)
    model, vocab = video_llm.model.eval(), video_llm.vocab
    ids, labels = video_batch(tokenizer, vocab)
    error = row_scoring_error(model, vocab, ids)
    assert error.rows <= LOGIT_RTOL * error.scale and error.text <= LOGIT_RTOL * error.scale, error
    loss = VideoLoss(model, vocab)
    terms, _ = loss(model, {"input_ids": ids, "labels": torch.where(labels == -100, ids, labels)})
    assert loss._transform_checked and int(terms.num_targets) == ids.shape[1] - 1

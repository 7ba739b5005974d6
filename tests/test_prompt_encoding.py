"""A1111 chunked, weighted prompt encoding in the engine (tiny real models, no mocks): weighted
renders equal a plain diffusers call given embeddings computed by the rules, long prompts use
their tail, batches never mix chunk counts, and the plain syntax refuses long prompts."""

from __future__ import annotations

import numpy as np
import pytest

from imagegen.engine import GenRequest, open_engine
from imagegen.errors import InputError

torch = pytest.importorskip("torch")

pytestmark = pytest.mark.usefixtures("one_thread")

BOS, EOS = 49406, 49407


def shifted(name: str):
    """A tiny engine whose text encoders give outputs with a mean clearly away from 0 (random
    CLIP averages about 0, where A1111's mean rescale divides noise by noise: FACTS.md)."""
    eng = open_engine(f"builtin:{name}", device="cpu")
    with torch.no_grad():
        for te in (eng.pipeline.text_encoder, getattr(eng.pipeline, "text_encoder_2", None)):
            if te is None:
                continue
            inner = getattr(te, "text_model", te)
            inner.embeddings.position_embedding.weight += 0.6
            inner.final_layer_norm.bias += 0.6
    return eng


@pytest.fixture(scope="module")
def sd15():
    return shifted("tiny-sd15")


@pytest.fixture(scope="module")
def sdxl():
    return shifted("tiny-sdxl")


def req(prompt, negative="", seed=3, **kw):
    base = dict(width=64, height=64, steps=4, guidance=6.0, scheduler="Euler")
    base.update(kw)
    return GenRequest(prompt, negative, seed, **base)


def px(image) -> np.ndarray:
    return np.asarray(image).astype(np.float32)


# --- the rules, written out independently of imagegen's parser ---------------------------------


def tok(pipe, text):
    return pipe.tokenizer(text, add_special_tokens=False).input_ids


def chunk_ids(pipe, pieces):
    """pieces: [(text, weight)] inside one chunk -> (ids 77, weights 77) with EOS padding."""
    ids, w = [BOS], [1.0]
    for text, weight in pieces:
        t = tok(pipe, text)
        ids += t
        w += [weight] * len(t)
    ids += [EOS] * (77 - len(ids))
    w += [1.0] * (77 - len(w))
    return ids, w


def rule_encode(encoder, chunks, *, hidden=None, pad_zero=False):
    outs, pooled = [], None
    for ids, w in chunks:
        if pad_zero:
            first = ids.index(EOS)
            ids = ids[: first + 1] + [0] * (76 - first)
        o = encoder(torch.tensor([ids]), output_hidden_states=True)
        z = o[0][0] if hidden is None else o.hidden_states[hidden][0]
        if pooled is None:
            pooled = o[0][:1]
        m0 = z.mean()
        zw = z * torch.tensor(w)[:, None]
        outs.append(zw * (m0 / zw.mean()))
    return torch.cat(outs)[None], pooled


PROMPT = [[("a ", 1.0), ("red", 1.5), (" vase, ", 1.0), ("blurry", 1 / 1.1)], [("studio light", 1.0)]]
PROMPT_TEXT = "a (red:1.5) vase, [blurry] BREAK studio light"
NEG = [[("ugly", 1.3)]]
NEG_TEXT = "(ugly:1.3)"


def plain_call(eng, kwargs, seed=3):
    pipe = eng.pipeline
    pipe.scheduler = eng._make_scheduler("Euler")
    out = pipe(width=64, height=64, num_inference_steps=4, guidance_scale=6.0, output_type="np",
               generator=[torch.Generator("cpu").manual_seed(seed)], **kwargs)
    return out.images[0] * 255


def test_weighted_sd15_render_equals_diffusers_with_rule_embeddings(sd15):
    pipe = sd15.pipeline
    with torch.no_grad():
        pos, _ = rule_encode(pipe.text_encoder, [chunk_ids(pipe, c) for c in PROMPT])
        neg, _ = rule_encode(pipe.text_encoder, [chunk_ids(pipe, c) for c in NEG] + [chunk_ids(pipe, [])])
        z = pipe.text_encoder(torch.tensor([chunk_ids(pipe, PROMPT[0])[0]]))[0]
    assert abs(float(z.mean())) > 0.1 * float(z.abs().mean())  # the rescale is not in its guarded zone
    assert pos.shape == neg.shape == (1, 154, 32)
    ref = plain_call(sd15, {"prompt_embeds": pos, "negative_prompt_embeds": neg})
    [got] = sd15.generate([req(PROMPT_TEXT, NEG_TEXT)])
    assert np.abs(px(got.image) - ref).max() <= 1.0
    # the weights matter, and each emphasis mode is its own image
    strong = "a (red vase:2.5), [[[blurry]]] BREAK studio light"
    [weighted] = sd15.generate([req(strong, guidance=9.0)])
    [plain] = sd15.generate([req("a red vase, blurry BREAK studio light", guidance=9.0)])
    [nonorm] = sd15.generate([req(strong, emphasis="no-norm", guidance=9.0)])
    [ignore] = sd15.generate([req(strong, emphasis="ignore", guidance=9.0)])
    diffs = [float(np.abs(px(o.image) - px(weighted.image)).max()) for o in (plain, nonorm, ignore)]
    assert min(diffs) > 2, diffs


def test_weighted_sdxl_render_equals_diffusers_with_rule_embeddings(sdxl):
    pipe = sdxl.pipeline
    with torch.no_grad():
        chunks = [chunk_ids(pipe, c) for c in PROMPT]
        l, _ = rule_encode(pipe.text_encoder, chunks, hidden=-2)
        g, pooled = rule_encode(pipe.text_encoder_2, chunks, hidden=-2, pad_zero=True)
        pos = torch.cat([l, g], dim=-1)
    assert pos.shape == (1, 154, 32 + 48) and pooled.shape == (1, 48)
    # an empty negative stays zeros (force_zeros_for_empty_prompt), padded to the prompt's length
    ref = plain_call(sdxl, {"prompt_embeds": pos, "pooled_prompt_embeds": pooled,
                            "negative_prompt_embeds": torch.zeros_like(pos),
                            "negative_pooled_prompt_embeds": torch.zeros_like(pooled)})
    [got] = sdxl.generate([req(PROMPT_TEXT)])
    assert np.abs(px(got.image) - ref).max() <= 1.0


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_long_prompt_tail_changes_pixels_and_plain_refuses_it(family, sd15, sdxl):
    eng = {"sd15": sd15, "sdxl": sdxl}[family]
    head = " ".join(["a quiet harbour town at dawn with fishing boats"] * 9)  # 81 tokens, no commas
    a, b = f"{head} and red sails", f"{head} and green neon signs"
    assert len(tok(eng.pipeline, a)) > 77
    ra, rb = eng.generate([req(a), req(b)])
    assert np.abs(px(ra.image) - px(rb.image)).max() > 2  # tokens past 77 reach the image
    with pytest.raises(InputError, match="CLIP tokens"):
        eng.generate([req(a, prompt_syntax="plain")])


def test_mixed_chunk_counts_in_one_batch_equal_single_renders(sd15):
    long = " ".join(["a lantern in the fog"] * 20)
    batch = sd15.generate([req("a cat", seed=1), req(long, seed=2), req("a dog", "(blurry:1.2)", seed=3)])
    singles = [sd15.generate([r])[0] for r in (req("a cat", seed=1), req(long, seed=2), req("a dog", "(blurry:1.2)", seed=3))]
    for x, y in zip(batch, singles):
        assert np.abs(px(x.image) - px(y.image)).max() <= 1.0


def test_mean_rescale_keeps_the_mean_and_guards_zero():
    from imagegen.engine.text import apply_emphasis

    g = torch.Generator().manual_seed(0)
    z = torch.randn(77, 16, generator=g) + 0.5
    w = torch.ones(77)
    w[3:6] = 1.4
    out = apply_emphasis(z, w, "original")
    assert float(out.mean()) == pytest.approx(float(z.mean()), rel=1e-5)
    assert torch.allclose(apply_emphasis(z, w, "no-norm"), z * w[:, None])
    assert torch.equal(apply_emphasis(z, w, "ignore"), z)
    centred = z - z.mean()  # mean ~0: no rescale (it would amplify noise), weights still applied
    assert torch.allclose(apply_emphasis(centred, w, "original"), centred * w[:, None])


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_textual_inversion_vectors_replace_the_name(family, sd15, sdxl, tmp_path):
    """The embedding's vectors enter exactly where token embeddings of placeholder ids would:
    the same as writing them into spare rows of the token table and prompting with those ids."""
    from safetensors.torch import save_file

    from imagegen.errors import ModelError

    eng = {"sd15": sd15, "sdxl": sdxl}[family]
    pipe = eng.pipeline
    g = torch.Generator().manual_seed(5)
    encoders = [pipe.text_encoder] + ([pipe.text_encoder_2] if family == "sdxl" else [])
    vecs = [torch.randn(2, te.config.hidden_size, generator=g) for te in encoders]
    path = tmp_path / "shinything.safetensors"
    save_file({"emb_params": vecs[0]} if family == "sd15" else {"clip_l": vecs[0], "clip_g": vecs[1]}, str(path))
    prompt, negative = "a (shinything:1.2) cup", "blurry"
    eng.set_embeddings([])
    without = eng._encode(prompt, negative, True, None)
    eng.set_embeddings([str(path)])
    try:
        with_emb = eng._encode(prompt, negative, True, None)
        # reference: the same prompt with the name's tokens replaced by two spare ids carrying the vectors
        spare = [40000, 40001]
        saved = [te.get_input_embeddings().weight[spare].clone() for te in encoders]
        with torch.no_grad():
            for te, v in zip(encoders, vecs):
                te.get_input_embeddings().weight[spare] = v
        try:
            from imagegen.engine import text as T
            from imagegen import prompt_syntax as ps

            runs = ps.parse_weights(prompt)
            chunks = ps.chunk_prompt(runs, lambda s: [spare[0], spare[1]] if s == "shinything" else ps.clip_tokenize(s),
                                     eos=ps.EOS_ID, comma=ps.COMMA_ID)
            assert chunks[0].tokens[1:3] == tuple(spare)
            hidden = None if family == "sd15" else -2
            with torch.no_grad():
                z, _ = T._encode_chunks(encoders[0], chunks, pad_after_eos=None, hidden=hidden, final_norm=family == "sd15",
                                        emphasis="original", vectors={}, device="cpu")
        finally:
            with torch.no_grad():
                for te, v in zip(encoders, saved):
                    te.get_input_embeddings().weight[spare] = v
        width = encoders[0].config.hidden_size
        assert torch.allclose(with_emb[0][..., :width], z, atol=1e-5)
        assert not torch.allclose(with_emb[0], without[0], atol=1e-3)
        [img] = eng.generate([req(prompt, negative)])
        assert img.error is None
    finally:
        eng.set_embeddings([])
    wrong = tmp_path / "wrong.safetensors"
    save_file({"emb_params": torch.randn(1, 7)}, str(wrong))
    with pytest.raises(ModelError, match="wrong"):
        eng.set_embeddings([str(wrong)])

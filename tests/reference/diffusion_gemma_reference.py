#!/usr/bin/env python3
"""A tiny random DiffusionGemma checkpoint and transformers' logits for it (edgediff's fixture).

Writes into OUT_DIR: config.json, model.safetensors, tokenizer.json (a word-level vocabulary of
the model's size) and reference.json:

    {transformers_version, torch_version, device, seed, window, prefix, canvas,
     encoder_logits [P][V],               # softcap(lm_head(encoder(prefix))) : the causal pass
     decoder_logits [C][V],               # the canvas pass, no self-conditioning (first step)
     self_cond_logits [C][V],             # the previous step's logits fed back ...
     decoder_sc_logits [C][V],            # ... and the canvas pass with them
     commit, commit_logits [C][V], canvas2, decoder2_logits [C][V],  # a second canvas after
                                                                     # re-encoding `commit`
     samplers: [{params, prompt, draws: [{"noise": [C]} | {"u": [C]}, ...], tokens, steps}]}

each of `samplers` is `model.generate` (DiffusionGemma's entropy-bound canvas sampler) with its randomness
injected: `EntropyBoundSampler.initialize_canvas` returns recorded uniform canvases and
`torch.multinomial` picks by inverse CDF from recorded uniforms (the first token whose cumulative
probability exceeds u), in the order generate() asks; edgediff replays the same draws and must ask
for them in the same order, take the same steps and commit the same tokens.

How the oracle runs: DiffusionGemmaForBlockDiffusion in float32, eager attention and experts,
DynamicCache (generate()'s default), TF32 off. The encoder pass's logits are not an output of the
transformers model (only the decoder's are); they are computed here with the model's own LM head
and softcap on `encoder_last_hidden_state`, which checks the encoder's math.

Every parameter and buffer is drawn at random (norm weights 1 ± 0.3, router and expert scales,
layer scalars different in encoder and decoder), so a piece applied as the identity or read from
the wrong copy shows up; the checkpoint is saved, reloaded and the oracle runs on the reloaded
model, so the reference is the function the file holds. Shapes are odd on purpose: hidden 24,
4 q heads over 2 KV heads of 8 on sliding layers (window 5, shorter than the prefix), global
layers of head_dim 12 over 1 KV head (K = V, 1 of 6 RoPE pairs rotated), 5 experts top-2.

On an accelerator (`--device cuda`) the same passes also run on the CPU and reference.json gets
`cpu_rel_l2` per output (device vs CPU), so a device-side difference is told apart from ours.

Usage: python3 diffusion_gemma_reference.py OUT_DIR [--device cpu|cuda] [--seed N]
           [--hidden 24 --layers 3 ...]  (see --help; the committed fixture uses the defaults)
The GPU machine runs several odd shapes through scripts/device-diffusion-gemma.sh; the Rust side
compares any such directory with `EDGEDIFF_DG_REFERENCES=DIR cargo test -p edgediff-tests
--test diffusion_gemma -- --ignored`.
"""

import argparse
import json
import pathlib

import torch

import transformers
from transformers import DiffusionGemmaConfig, DiffusionGemmaForBlockDiffusion
from transformers.cache_utils import DynamicCache


def word_level_tokenizer(vocab_size):
    from tokenizers import Tokenizer, models, pre_tokenizers

    specials = ["<pad>", "<eos>", "<bos>", "<unk>"]
    vocab = {t: i for i, t in enumerate(specials)}
    for i in range(len(specials), vocab_size):
        vocab[f"w{i}"] = i
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    for i, t in enumerate(specials):
        tok.add_special_tokens([t])
    return tok


def run_sampler(model, prefix, args, eos=None, stability=1, confidence=100.0):
    """generate() with recorded draws (see the module doc)."""
    from unittest import mock

    from transformers.models.diffusion_gemma import generation_diffusion_gemma as gen

    g = torch.Generator().manual_seed(args.seed + 2)
    draws = []
    vocab = model.config.text_config.vocab_size

    def initialize_canvas(self, batch_size, device):
        canvas = torch.randint(0, vocab, (batch_size, self.canvas_length), generator=g)
        draws.append({"noise": canvas[0].tolist()})
        return canvas.to(device)

    def multinomial(probs, num_samples=1, **kwargs):
        u = torch.rand(probs.shape[0], generator=g)
        draws.append({"u": [float(x) for x in u]})
        c = probs.float().cumsum(-1)
        idx = (c <= (u.to(c.device)[:, None] * c[:, -1:])).sum(-1).clamp(max=probs.shape[-1] - 1)
        return idx[:, None]

    params = dict(max_new_tokens=3 * args.canvas, max_denoising_steps=5, t_min=0.4, t_max=0.8,
                  stability_threshold=stability, confidence_threshold=confidence, eos_token_id=eos,
                  pad_token_id=0)
    bound = 1.5  # several tokens accepted per step in a random model (the default 0.1: about one)
    with mock.patch.object(gen.EntropyBoundSampler, "initialize_canvas", initialize_canvas), \
            mock.patch.object(gen.torch, "multinomial", multinomial), torch.no_grad():
        out = model.generate(input_ids=prefix.to(model.device),
                             sampler_config=gen.EntropyBoundSamplerConfig(entropy_bound=bound),
                             **params)
    tokens = out.sequences[0, prefix.shape[1]:].tolist()
    # Per canvas: its initial noise, then per step a u-draw followed by the renoising noise.
    steps, prev_u = [], False
    for d in draws:
        if "u" in d:
            steps[-1] += 1
        elif not prev_u:
            steps.append(0)
        prev_u = "u" in d
    return {"params": {**params, "entropy_bound": bound}, "prompt": prefix[0].tolist(),
            "draws": draws, "tokens": tokens, "steps": steps}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--seed", type=int, default=18)
    ap.add_argument("--vocab", type=int, default=67)
    ap.add_argument("--hidden", type=int, default=24)
    ap.add_argument("--layers", type=int, default=3)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--head-dim", type=int, default=8)
    ap.add_argument("--global-head-dim", type=int, default=12)
    ap.add_argument("--global-kv-heads", type=int, default=1)
    ap.add_argument("--ffn", type=int, default=20)
    ap.add_argument("--experts", type=int, default=5)
    ap.add_argument("--top-k", type=int, default=2)
    ap.add_argument("--expert-ffn", type=int, default=6)
    ap.add_argument("--window", type=int, default=5)
    ap.add_argument("--prefix", type=int, default=9)
    ap.add_argument("--canvas", type=int, default=7)
    args = ap.parse_args()

    torch.manual_seed(args.seed)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    types = ["sliding_attention" if (i + 1) % 3 else "full_attention" for i in range(args.layers)]
    text = dict(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.ffn,
        num_hidden_layers=args.layers, num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads, head_dim=args.head_dim,
        global_head_dim=args.global_head_dim, num_global_key_value_heads=args.global_kv_heads,
        sliding_window=args.window, layer_types=types, num_experts=args.experts,
        top_k_experts=args.top_k, moe_intermediate_size=args.expert_ffn,
        max_position_embeddings=256, pad_token_id=0, eos_token_id=1, bos_token_id=2,
    )
    # A minimal vision tower: the checkpoint carries one, as the real one does; edgediff skips it.
    vision = dict(model_type="gemma4_vision", hidden_size=8, intermediate_size=8,
                  num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2, head_dim=4,
                  patch_size=2, position_embedding_size=4, pooling_kernel_size=1)
    cfg = DiffusionGemmaConfig(text_config=text, vision_config=vision, canvas_length=args.canvas)
    cfg._attn_implementation = "eager"
    model = DiffusionGemmaForBlockDiffusion(cfg)
    with torch.no_grad():
        for name, p in list(model.named_parameters()) + list(model.named_buffers()):
            if "inv_freq" in name or name.endswith("embed_scale"):
                continue
            if p.ndim == 1 or name.endswith("layer_scalar"):
                p.copy_(1.0 + 0.3 * torch.randn_like(p))
            else:
                p.copy_(torch.randn_like(p) * (p.shape[-1] ** -0.5))
    model.save_pretrained(out)
    model = DiffusionGemmaForBlockDiffusion.from_pretrained(
        out, dtype=torch.float32, attn_implementation="eager", experts_implementation="eager"
    ).to(args.device).eval()
    enc_layers = model.model.encoder.language_model.layers
    dec_layers = model.model.decoder.layers
    assert enc_layers[0].self_attn.q_proj.weight.data_ptr() == dec_layers[0].self_attn.q_proj.weight.data_ptr(), \
        "encoder and decoder weights are tied"
    assert not torch.equal(enc_layers[0].layer_scalar, dec_layers[0].layer_scalar), "scalars differ"
    word_level_tokenizer(args.vocab).save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>"}, indent=1))

    g = torch.Generator().manual_seed(args.seed + 1)
    rand_tokens = lambda n: torch.randint(4, args.vocab, (1, n), generator=g)
    prefix, canvas, commit, canvas2 = (rand_tokens(args.prefix), rand_tokens(args.canvas),
                                       rand_tokens(args.canvas), rand_tokens(args.canvas))

    def passes(model, device, self_cond_in=None):
        dev = lambda t: t.to(device)
        cap = model.final_logit_softcapping

        def head(hidden):
            logits = model.lm_head(hidden).float()
            return torch.tanh(logits / cap) * cap

        with torch.no_grad():
            cache = DynamicCache(config=model.config.get_text_config())
            enc = model.model.encoder(input_ids=dev(prefix), past_key_values=cache)
            encoder_logits = head(enc.last_hidden_state)[0]
            first = model(decoder_input_ids=dev(canvas), past_key_values=cache).logits[0]
            # The sampler feeds back tempered logits; any [C, V] array exercises the block.
            self_cond = (first / 0.7).unsqueeze(0) if self_cond_in is None else dev(self_cond_in)
            second = model(decoder_input_ids=dev(canvas), past_key_values=cache,
                           self_conditioning_logits=self_cond).logits[0]
            # Commit a canvas: re-encode it into the cache (positions P..P+C), then a new canvas.
            enc2 = model.model.encoder(input_ids=dev(commit), past_key_values=cache)
            commit_logits = head(enc2.last_hidden_state)[0]
            third = model(decoder_input_ids=dev(canvas2), past_key_values=cache).logits[0]
            assert cache.get_seq_length() == args.prefix + args.canvas
        return {
            "encoder_logits": encoder_logits.cpu(),
            "decoder_logits": first.cpu(),
            "self_cond_logits": self_cond[0].cpu(),
            "decoder_sc_logits": second.cpu(),
            "commit_logits": commit_logits.cpu(),
            "decoder2_logits": third.cpu(),
        }

    out_logits = passes(model, args.device)
    cpu_rel_l2 = None
    if args.device != "cpu":
        # The CPU run is fed the device's self-conditioning logits, so both see one input.
        cpu_model = model.to("cpu")
        cpu = passes(cpu_model, "cpu", out_logits["self_cond_logits"].unsqueeze(0))
        cpu_rel_l2 = {k: float((cpu[k] - v).norm() / v.norm()) for k, v in out_logits.items()
                      if k != "self_cond_logits"}
        print("device vs cpu rel L2:", cpu_rel_l2)
    # EOS: a token the second canvas commits and the first does not, so the EOS path (pad after
    # it, generation ends) runs; the draws are the same in both runs, so is everything before it.
    free = run_sampler(model, prefix, args)["tokens"]
    c = args.canvas
    eos = next((t for t in free[c:2 * c] if t not in free[:c]), None)
    # Two runs: (a) stop when the argmax canvas repeats (confidence 100 nats: always confident;
    # a random model's canvas never settles in 5 steps) and the EOS path; (b) no stability
    # requirement and a confidence threshold (2.7 nats) a random model's tempered mean entropy
    # crosses after a few steps, so canvases stop early.
    samplers = [run_sampler(model, prefix, args, eos),
                run_sampler(model, prefix, args, None, stability=0, confidence=2.7)]

    rows = lambda t: [[float(v) for v in r] for r in t.cpu()]
    ref = {
        "transformers_version": transformers.__version__,
        "torch_version": torch.__version__,
        "device": args.device,
        "seed": args.seed,
        "window": args.window,
        "prefix": prefix[0].tolist(),
        "canvas": canvas[0].tolist(),
        "commit": commit[0].tolist(),
        "canvas2": canvas2[0].tolist(),
        "shape": {k: v for k, v in vars(args).items() if k not in ("out", "device")},
        "cpu_rel_l2": cpu_rel_l2,
        **{k: rows(v) for k, v in out_logits.items()},
        "samplers": samplers,
    }
    (out / "reference.json").write_text(json.dumps(ref))
    print(f"wrote {out}: {sum(1 for _ in out.iterdir())} files")


if __name__ == "__main__":
    main()

"""With a seed, a sample depends only on (seed + its prompt's index, its index among the prompt's samples), the prompt
and the weights: not on the other prompts of the request, on how the orchestrator split the batch into shares
(seeded seed + offset), or on the micro-batch size. And each sample is an exact draw from the tempered, filtered
softmax."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from services.generation.backend import GenerationBackend
from services.generation.config import GenerationConfig
from shared.tiny_models import build_policy
from shared.types import Sample, SamplingParams

# Prompts of different lengths, so that rows are left-padded differently in each batching.
PROMPTS = [
    torch.tensor([5, 6, 7]),
    torch.tensor([11]),
    torch.tensor([40, 41, 42, 43]),
    torch.tensor([9, 30]),
    torch.tensor([17, 18, 19, 20, 21, 22]),
    torch.tensor([100]),
    torch.tensor([64, 65]),
    torch.tensor([200, 201, 202, 203, 204]),
]
EXTRA = [torch.tensor([300, 301, 302]), torch.tensor([12, 13, 14, 15, 16, 17, 18, 19, 20])]
DRAWS = 4000  # samples in the distribution tests


@pytest.fixture(scope="module")
def sharp_policy_dir(tmp_path_factory):
    """The tiny policy with its output head scaled by 30: a random tiny model's next-token distribution is nearly
    uniform over ~500 tokens (logit std 0.16), where 4000 draws could not tell T = 0.7 from T = 1; scaled, the mass
    sits on a few tokens, as in a trained model."""
    directory = build_policy(tmp_path_factory.mktemp("sharp-policy"))
    model = AutoModelForCausalLM.from_pretrained(directory)
    with torch.no_grad():
        model.lm_head.weight.mul_(30.0)
    model.save_pretrained(directory, safe_serialization=True)
    return directory


def _backend(model_dir, micro_batch_size: int = 64) -> GenerationBackend:
    return GenerationBackend(
        GenerationConfig.model_validate(
            {
                "model": {"path": str(model_dir)},
                "micro_batch_size": micro_batch_size,
                "max_samples": DRAWS,
                "max_samples_per_prompt": DRAWS,
            }
        )
    )


@pytest.fixture(scope="module")
def backend(sharp_policy_dir):
    return _backend(sharp_policy_dir)


def _tokens(samples: list[Sample]) -> list[list[int]]:
    return [s.response_ids.tolist() for s in samples]


def _largest_logprob_difference(got: list[Sample], want: list[Sample]) -> float:
    return max(float((a.response_logprobs - b.response_logprobs).abs().max()) for a, b in zip(got, want, strict=True))


def _params(**overrides) -> SamplingParams:
    defaults = {"max_new_tokens": 12, "temperature": 0.7, "seed": 1234, "samples_per_prompt": 2}
    return SamplingParams(**{**defaults, **overrides})


def test_the_same_request_with_the_same_seed_gives_the_same_samples(backend):
    first = backend.generate(PROMPTS, _params(top_k=20, top_p=0.95))
    second = backend.generate(PROMPTS, _params(top_k=20, top_p=0.95))
    assert _tokens(first) == _tokens(second)
    for a, b in zip(first, second, strict=True):
        assert torch.equal(a.response_logprobs, b.response_logprobs)
    # Without a seed each request draws its own.
    unseeded = [_tokens(backend.generate(PROMPTS, _params(seed=None))) for _ in range(2)]
    assert unseeded[0] != unseeded[1]


@pytest.mark.parametrize("model_fixture", ["sharp_policy_dir", "tiny_tied_policy_dir"])
def test_samples_do_not_depend_on_how_the_batch_is_split_or_batched(request, model_fixture):
    model_dir = request.getfixturevalue(model_fixture)
    backend = _backend(model_dir)
    params = _params()
    whole = backend.generate(PROMPTS, params)
    assert [s.prompt_index for s in whole] == [i for i in range(len(PROMPTS)) for _ in range(2)]

    # The orchestrator's shares: each seeded with the batch seed plus the offset of its first prompt.
    shares = backend.generate(PROMPTS[:3], params) + backend.generate(PROMPTS[3:], _params(seed=1234 + 3))
    one_by_one = _backend(model_dir, micro_batch_size=1).generate(PROMPTS, params)
    five = _backend(model_dir, micro_batch_size=5).generate(PROMPTS, params)  # micro-batches cut a prompt's pair
    sixteen = _backend(model_dir, micro_batch_size=16).generate(PROMPTS, params)
    with_others = backend.generate(PROMPTS + EXTRA, params)[: 2 * len(PROMPTS)]

    differences = {}
    for name, samples in [
        ("shares", shares),
        ("micro_batch_size 1", one_by_one),
        ("micro_batch_size 5", five),
        ("micro_batch_size 16", sixteen),
        ("with other prompts", with_others),
    ]:
        assert _tokens(samples) == _tokens(whole), name
        differences[name] = _largest_logprob_difference(samples, whole)
    print(f"{model_fixture}: largest log-prob difference from the whole batch: {differences}")
    # Rows padded to other widths: float rounding of the forward only (~1e-6 here, ~5e-6 with the head x30).
    assert max(differences.values()) < 1e-5
    # The two samples of a prompt come from different streams.
    assert any(whole[2 * i].response_ids.tolist() != whole[2 * i + 1].response_ids.tolist() for i in range(8))


def test_different_seeds_give_different_samples(backend):
    draws = {tuple(map(tuple, _tokens(backend.generate(PROMPTS, _params(seed=seed))))) for seed in range(4)}
    assert len(draws) == 4


def test_greedy_is_the_argmax_continuation(backend, sharp_policy_dir):
    model = AutoModelForCausalLM.from_pretrained(sharp_policy_dir).eval()
    samples = backend.generate(PROMPTS, _params(temperature=0.0, seed=None, max_new_tokens=6))
    assert _tokens(samples) == _tokens(backend.generate(PROMPTS, _params(temperature=0.0, seed=5, max_new_tokens=6)))
    for sample in samples:
        ids = sample.prompt_ids
        for token in sample.response_ids:
            with torch.no_grad():
                assert int(model(ids[None]).logits[0, -1].argmax()) == int(token)
            ids = torch.cat([ids, token[None]])


def _first_token_frequencies(backend: GenerationBackend, prompt: torch.Tensor, **sampling) -> torch.Tensor:
    """(V,) how often each token is drawn first, over DRAWS samples of ``prompt`` (DRAWS different streams)."""
    params = SamplingParams(max_new_tokens=1, seed=99, samples_per_prompt=DRAWS, **sampling)
    first = torch.tensor([int(s.response_ids[0]) for s in backend.generate([prompt], params)])
    return torch.bincount(first, minlength=backend.vocab_size).double() / DRAWS


def _total_variation(p: torch.Tensor, q: torch.Tensor) -> float:
    return 0.5 * float((p - q).abs().sum())


def test_samples_follow_the_tempered_filtered_softmax(sharp_policy_dir):
    backend = _backend(sharp_policy_dir, micro_batch_size=DRAWS)
    prompt, temperature = PROMPTS[0], 0.7
    model = AutoModelForCausalLM.from_pretrained(sharp_policy_dir).eval()
    with torch.no_grad():
        logits = model(prompt[None]).logits[0, -1].double()  # (V,)
    tempered = torch.softmax(logits / temperature, dim=-1)

    # No filter: softmax(logits / T). At 4000 draws the empirical TV of a correct sampler is ~0.02 here.
    frequencies = _first_token_frequencies(backend, prompt, temperature=temperature)
    assert _total_variation(frequencies, tempered) < 0.05
    # The test can see the bugs it guards against: the untempered softmax, and noise of the wrong sign (argmax of
    # scores + log E), are both ~0.2 away from the right distribution.
    assert _total_variation(torch.softmax(logits, dim=-1), tempered) > 0.15
    generator = torch.Generator().manual_seed(0)
    noise = torch.empty(DRAWS, logits.numel(), dtype=torch.float64).exponential_(generator=generator)
    wrong_sign = torch.bincount((logits / temperature + noise.log()).argmax(-1), minlength=logits.numel()) / DRAWS
    assert _total_variation(wrong_sign.double(), tempered) > 0.15

    # Top-k 3: only the 3 most likely tokens, in proportion to their probabilities.
    top3 = tempered.topk(3).indices
    renormalised = torch.zeros_like(tempered)
    renormalised[top3] = tempered[top3] / tempered[top3].sum()
    frequencies = _first_token_frequencies(backend, prompt, temperature=temperature, top_k=3)
    assert set(frequencies.nonzero().flatten().tolist()) <= set(top3.tolist())
    assert _total_variation(frequencies, renormalised) < 0.05

    # Top-p 0.8: the nucleus is the tokens with less than 0.8 of the mass strictly above them.
    top_p = 0.8
    mass_above = torch.tensor([float(tempered[tempered > q].sum()) for q in tempered])
    nucleus = mass_above < top_p
    assert 1 < int(nucleus.sum()) < 20
    renormalised = torch.where(nucleus, tempered, 0.0)
    renormalised /= renormalised.sum()
    frequencies = _first_token_frequencies(backend, prompt, temperature=temperature, top_p=top_p)
    assert bool((frequencies[~nucleus] == 0).all())
    assert _total_variation(frequencies, renormalised) < 0.05

"""Sampler tests: every parameter changes what is drawn, exactly as vLLM / OpenAI define it."""

import math

import pytest
import torch

from moeflash.engine.sampler import SampleResult, SamplingParams, make_generator, sample

V = 50


def run(logits, params, generators=None, prompt=None, output=None):
    """Sample a batch; logits may be one row [V] or a batch [B, V]."""
    logits = logits if logits.dim() == 2 else logits.unsqueeze(0)
    b = logits.shape[0]
    params = params if isinstance(params, list) else [params] * b
    generators = generators if generators is not None else [None] * b
    return sample(logits, params, generators, prompt or [[] for _ in range(b)], output or [[] for _ in range(b)])


def draws(logits, params, n, seed=0):
    """n tokens from the same logits, one seeded generator shared across the draws."""
    g = torch.Generator().manual_seed(seed)
    batch = logits.unsqueeze(0).expand(n, -1)
    return [r.token_id for r in run(batch, params, [g] * n)]


def random_logits(seed=0, v=V, scale=3.0):
    return torch.randn(v, generator=torch.Generator().manual_seed(seed)) * scale


# -- validation ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("field, value", [
    ("max_tokens", 0), ("max_tokens", "16"), ("max_tokens", True), ("max_tokens", 2.0),
    ("temperature", -1), ("temperature", float("nan")), ("temperature", float("inf")), ("temperature", "1"),
    ("top_p", 0), ("top_p", 1.5), ("top_p", float("nan")),
    ("top_k", -2), ("top_k", 1.5), ("top_k", False),
    ("min_p", -0.1), ("min_p", 1.1),
    ("seed", "1"), ("seed", True), ("seed", 2**64), ("seed", 1.0),
    ("stop", ""), ("stop", [""]), ("stop", ["ok", 3]), ("stop", 5),
    ("stop_token_ids", [-1]), ("stop_token_ids", ["1"]), ("stop_token_ids", 7),
    ("presence_penalty", 2.5), ("presence_penalty", -2.1),
    ("frequency_penalty", 3), ("frequency_penalty", float("nan")),
    ("repetition_penalty", 0), ("repetition_penalty", -1.0),
    ("logprobs", -1), ("logprobs", 21), ("logprobs", True),
    ("ignore_eos", 1), ("ignore_eos", "yes"),
])
def test_validation_names_the_field(field, value):
    with pytest.raises(ValueError, match=f"^{field} "):
        SamplingParams(**{field: value})


def test_validation_message_shows_the_bad_value():
    with pytest.raises(ValueError, match=r"^temperature must be >= 0.*got -1$"):
        SamplingParams(temperature=-1)


def test_defaults_and_normalisation():
    p = SamplingParams(stop="###", stop_token_ids=(5, 6), top_k=-1, seed=2**64 - 1)
    assert p.stop == ["###"] and p.stop_token_ids == [5, 6]
    assert SamplingParams().stop == [] and SamplingParams().stop_token_ids == []
    d = SamplingParams()
    assert (d.max_tokens, d.temperature, d.top_p, d.top_k, d.min_p, d.repetition_penalty) == (16, 1.0, 1.0, 0, 0.0, 1.0)


def test_bad_batch_inputs_are_explained():
    with pytest.raises(ValueError, match="params has 1 entries but logits has 2 rows"):
        sample(torch.zeros(2, V), [SamplingParams()], [None, None], [[], []], [[], []])
    with pytest.raises(ValueError, match="outside the vocabulary"):
        run(torch.zeros(V), SamplingParams(repetition_penalty=1.2), prompt=[[V]])
    with pytest.raises(ValueError, match="NaN"):
        run(torch.full((V,), float("nan")), SamplingParams())


# -- choosing the token ----------------------------------------------------------------------------------

def test_temperature_zero_is_argmax_with_lowest_id_on_ties():
    for seed in range(10):
        logits = random_logits(seed)
        assert run(logits, SamplingParams(temperature=0))[0].token_id == int(logits.argmax())
    tied = torch.zeros(V)
    tied[[7, 3, 30]] = 5.0
    assert run(tied, SamplingParams(temperature=0))[0].token_id == 3


def test_any_float_dtype():
    logits = random_logits(1)
    for dtype in (torch.float16, torch.bfloat16, torch.float64):
        r = run(logits.to(dtype), SamplingParams(temperature=0))[0]
        assert r.token_id == int(logits.to(dtype).float().argmax())


def test_top_k_1_is_greedy_at_temperature_1():
    for seed in range(30):
        logits = random_logits(seed, scale=0.5)  # flat: without top_k most draws would not be the argmax
        g = make_generator(seed)
        assert run(logits, SamplingParams(top_k=1), [g])[0].token_id == int(logits.argmax())


def test_top_k_2_never_leaves_the_two_best():
    logits = random_logits(3, scale=0.3)
    best = set(logits.topk(2).indices.tolist())
    got = draws(logits, SamplingParams(top_k=2), 2000)
    assert set(got) == best
    assert len(set(draws(logits, SamplingParams(), 2000))) > 2  # the same draws without top_k spread out


def test_small_top_p_keeps_only_the_top_token():
    logits = random_logits(4, scale=0.5)
    assert set(draws(logits, SamplingParams(top_p=0.01), 500)) == {int(logits.argmax())}


def test_top_p_keeps_the_smallest_set_reaching_the_mass():
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    assert set(draws(logits, SamplingParams(top_p=0.75), 2000)) == {0, 1}
    assert set(draws(logits, SamplingParams(top_p=0.85), 2000)) == {0, 1, 2}


def test_min_p_drops_tokens_below_a_fraction_of_the_best():
    probs = torch.tensor([0.4, 0.3, 0.15, 0.1, 0.05])
    logits = torch.log(probs)
    assert set(draws(logits, SamplingParams(min_p=0.3), 3000)) == {0, 1, 2}  # 0.3 * 0.4 = 0.12
    assert set(draws(logits, SamplingParams(min_p=0.2), 3000)) == {0, 1, 2, 3}  # 0.08
    assert set(draws(logits, SamplingParams(), 3000)) == {0, 1, 2, 3, 4}


def test_temperature_1_matches_softmax():
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, -3.0])
    n = 20000
    counts = torch.bincount(torch.tensor(draws(logits, SamplingParams(), n, seed=123)), minlength=6).float()
    expected = torch.softmax(logits, -1) * n
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < 30, (counts, expected)  # 5 degrees of freedom: p < 1e-5 above 30


def test_temperature_sharpens_and_flattens():
    logits = torch.tensor([1.0, 0.0, 0.0, 0.0])
    top = lambda t: draws(logits, SamplingParams(temperature=t), 4000).count(0) / 4000
    assert top(0.25) > 0.9 > top(1.0) > 0.4 > 0.3 > top(10.0)  # 0.95, 0.48, 0.27


# -- reproducibility -------------------------------------------------------------------------------------

def test_seeded_draws_do_not_depend_on_the_batch():
    steps = [random_logits(100 + s, scale=0.5) for s in range(20)]
    p = SamplingParams(seed=7)

    def alone():
        g = make_generator(p.seed)
        return [run(x, p, [g])[0].token_id for x in steps]

    def in_batch():
        g, g_other = make_generator(p.seed), make_generator(99)
        out = []
        for s, x in enumerate(steps):
            others = [random_logits(500 + s + k, scale=0.5) for k in range(3)]
            batch = torch.stack([others[0], others[1], x, others[2]])
            ps = [SamplingParams(top_k=5), SamplingParams(seed=99), p, SamplingParams()]
            out.append(run(batch, ps, [None, g_other, g, None])[2].token_id)
        return out

    assert alone() == alone() == in_batch()


def test_different_seeds_differ():
    steps = [random_logits(200 + s, scale=0.3) for s in range(20)]
    seqs = set()
    for seed in (1, 2, 3):
        g = make_generator(seed)
        seqs.add(tuple(run(x, SamplingParams(seed=seed), [g])[0].token_id for x in steps))
    assert len(seqs) == 3


def test_make_generator():
    assert make_generator(None) is None
    a, b = make_generator(5), make_generator(5)
    assert torch.equal(torch.rand(4, generator=a), torch.rand(4, generator=b))


# -- penalties -------------------------------------------------------------------------------------------

def test_presence_and_frequency_follow_the_openai_formula():
    logits = torch.tensor([3.0, 2.9, 2.0, 1.0])
    out = [[0, 0, 0, 2]]
    # token 0 drops by presence + 3 * frequency = 0.5 + 0.3 = 0.8 -> 2.2 < 2.9: greedy now picks 1
    r = run(logits, SamplingParams(temperature=0, presence_penalty=0.5, frequency_penalty=0.1), output=out)
    assert r[0].token_id == 1
    # presence alone 0.05 keeps 0 on top (2.95 > 2.9); frequency alone counts all three copies (2.85 < 2.9)
    assert run(logits, SamplingParams(temperature=0, presence_penalty=0.05), output=out)[0].token_id == 0
    assert run(logits, SamplingParams(temperature=0, frequency_penalty=0.05), output=out)[0].token_id == 1
    # penalties read the output only, never the prompt
    assert run(logits, SamplingParams(temperature=0, presence_penalty=2.0), prompt=out)[0].token_id == 0


def test_penalties_shift_the_sampled_distribution_by_the_formula():
    logits = torch.zeros(4)
    n = 4000
    for presence, frequency in [(1.0, 0.0), (0.0, 0.5), (-1.0, 0.0), (0.0, -0.5)]:
        p = SamplingParams(presence_penalty=presence, frequency_penalty=frequency)
        g = torch.Generator().manual_seed(1)
        rows = run(logits.expand(n, -1), p, [g] * n, output=[[1, 1]] * n)
        share = sum(r.token_id == 1 for r in rows) / n
        shifted = torch.tensor([0.0, -(presence + 2 * frequency), 0.0, 0.0])
        expected = float(torch.softmax(shifted, -1)[1])
        assert abs(share - expected) < 0.02, (presence, frequency, share, expected)
        assert (share < 0.25) == (presence + frequency > 0)  # positive lowers, negative raises


def test_repetition_penalty_divides_positive_and_multiplies_negative_logits():
    # prompt token 0 (logit 2.0) falls below token 1 (1.5): 2.0 / 2 = 1.0
    logits = torch.tensor([2.0, 1.5, -5.0, -5.0])
    assert run(logits, SamplingParams(temperature=0, repetition_penalty=2.0), prompt=[[0]])[0].token_id == 1
    assert run(logits, SamplingParams(temperature=0), prompt=[[0]])[0].token_id == 0
    # negative logits get more negative: -1.0 * 2 = -2.0 falls below -1.5 (dividing would have raised it)
    logits = torch.tensor([-1.0, -1.5, -5.0])
    assert run(logits, SamplingParams(temperature=0, repetition_penalty=2.0), output=[[0]])[0].token_id == 1
    # a penalty below 1 rewards repeats
    logits = torch.tensor([1.0, 1.5])
    assert run(logits, SamplingParams(temperature=0, repetition_penalty=0.5), prompt=[[0]])[0].token_id == 0


# -- logprobs --------------------------------------------------------------------------------------------

def test_logprobs_are_of_the_raw_logits():
    logits = random_logits(9)
    raw = torch.log_softmax(logits, -1)
    p = SamplingParams(logprobs=5, temperature=0.7, repetition_penalty=1.3, presence_penalty=1.0)
    r = run(logits, p, [make_generator(0)], prompt=[[1, 2]], output=[[3]])[0]
    assert isinstance(r, SampleResult)
    assert math.isclose(r.logprob, float(raw[r.token_id]), rel_tol=1e-6)
    assert len(r.top_logprobs) == 5
    assert [t for t, _ in r.top_logprobs] == raw.topk(5).indices.tolist()
    values = [lp for _, lp in r.top_logprobs]
    assert values == sorted(values, reverse=True)
    assert all(math.isclose(lp, float(raw[t]), rel_tol=1e-6) for t, lp in r.top_logprobs)


def test_logprobs_none_and_zero():
    logits = random_logits(10)
    r_none, r_zero = run(torch.stack([logits, logits]), [SamplingParams(), SamplingParams(logprobs=0)])
    assert r_none.top_logprobs is None and r_zero.top_logprobs == []
    assert r_zero.logprob <= 0


def test_extreme_penalties_keep_sampling_defined():
    """A repetition penalty of 5e-324 (valid: > 0) turns positive logits into +inf; the row must
    still sample (a schema fuzzer found the NaN probabilities this used to give)."""
    logits = torch.tensor([[3.0, 1.0, -2.0, 0.5]])
    for penalty in (5e-324, 1e-300, 2.0):
        p = SamplingParams(temperature=1.0, repetition_penalty=penalty, seed=0)
        res = sample(logits, [p], [make_generator(0)], [[0, 1, 2]], [[3]])
        assert 0 <= res[0].token_id < 4
        p = SamplingParams(temperature=0.7, repetition_penalty=penalty, presence_penalty=2.0, top_p=0.5,
                           min_p=0.1, seed=0, logprobs=2)
        res = sample(logits, [p], [make_generator(0)], [[0, 1, 2]], [[3]])
        assert 0 <= res[0].token_id < 4 and not math.isnan(res[0].logprob)


def test_top_k_beyond_the_vocabulary_keeps_everything():
    """top_k larger than the vocabulary (even beyond int64, as a fuzzer sent) means no top-k cut."""
    logits = torch.tensor([[3.0, 1.0, -2.0, 0.5]])
    for k in (4, 5, 2**70):
        res = sample(logits, [SamplingParams(temperature=1.0, top_k=k, logprobs=4)], [make_generator(1)],
                     [[0]], [[]])
        assert len(res[0].top_logprobs) == 4


def test_temperatures_below_1e5_are_greedy():
    """4e-244 (a fuzzer's value) underflows to 0 in fp32; such temperatures sample as argmax."""
    logits = torch.tensor([[0.5, 3.0, 2.9, -1.0]])
    for t in (4.4711029294290025e-244, 1e-6):
        p = SamplingParams(temperature=t, top_p=0.78, min_p=0.78)
        assert p.greedy and sample(logits, [p], [make_generator(3)], [[0]], [[]])[0].token_id == 1
    assert not SamplingParams(temperature=1e-4).greedy

"""Quality recovery by distillation (cqil_fx.eager.distill) on tiny random models.

The student trains under the hook-based reference semantics; these tests check
that training moves the loss and only the trained weights, that the gradients
the hooks give equal those of the compiled backend's graph, that saved weights
come back with their plan, and that the compiled recovered model equals the
reference on the recovered weights.
"""

import copy
import math
import warnings

import pytest
import torch

from cqil_fx import (CQILConfig, CQILConfigError, Plan, PlanMismatchWarning, RecoveredWeightsError, cqil_reference,
                     distill_plan, load_recovered, make_backend, recover, save_recovered)
from cqil_fx.tools.cli import main as cli_main
from cqil_fx.eager.distill import _HiddenMatch, distillation_kl
from cqil_fx.eager.quality import perplexity
from cqil_fx.eager.reference import cqil_semantics
from cqil_fx.stack import decoder_layers
from cqil_fx.eager.similarity import SimilarityReport
from cqil_fx.tools.study import Row, plan_label, write_report

from conftest import relative_error
from tiny_models import VOCAB, tiny_model, tokens

CONFIG = CQILConfig(start=2, end=6, parallel=2, bypass=1)
PLAN = CONFIG.plan_for(8)
TRAINED = {2, 3, 4, 5}
TRAIN = [tokens(batch=2, length=12, seed=s) for s in range(4)]
HELD_OUT = [tokens(batch=2, length=12, seed=s) for s in range(10, 12)]


def fresh(family="llama"):
    return copy.deepcopy(tiny_model(family))


def kl_to_teacher(student, teacher, plan, batches):
    with torch.no_grad(), cqil_semantics(student, plan):
        losses = []
        for ids in batches:
            target = torch.log_softmax(teacher(ids, use_cache=False).logits, -1)
            losses.append(distillation_kl(student(ids, use_cache=False).logits, target).item())
    return sum(losses) / len(losses)


def changed_blocks(a, b):
    return {i for i, (x, y) in enumerate(zip(decoder_layers(a), decoder_layers(b)))
            if any(not torch.equal(p, q) for p, q in zip(x.parameters(), y.parameters()))}


def changed_outside_blocks(a, b):
    layers = {id(p) for p in decoder_layers(a).parameters()}
    return [n for (n, p), q in zip(a.named_parameters(), b.parameters())
            if id(p) not in layers and not torch.equal(p, q)]


@pytest.mark.parametrize("method, lr", [("full", 3e-3), ("lora", 1e-2)])
def test_few_steps_lower_the_loss_and_change_only_the_grouped_blocks(method, lr):
    teacher = fresh()
    snapshot = copy.deepcopy(teacher.state_dict())
    result = distill_plan(teacher, CONFIG, TRAIN, steps=12, method=method, lr=lr, rank=4, top_k=32, progress=False)
    before = kl_to_teacher(fresh(), teacher, PLAN, TRAIN)
    after = kl_to_teacher(result.model, teacher, PLAN, TRAIN)
    assert after < 0.8 * before, (before, after)
    assert changed_blocks(result.model, teacher) == TRAINED
    assert changed_outside_blocks(result.model, teacher) == []
    assert all(torch.equal(v, snapshot[k]) for k, v in teacher.state_dict().items()), "the teacher changed"
    assert result.steps == 12 and result.trained_blocks == tuple(sorted(TRAINED))
    assert not any(p.requires_grad for p in result.model.parameters())


def test_lora_merges_back_into_plain_linear_layers():
    model = recover(fresh(), CONFIG, TRAIN, steps=2, method="lora", rank=2, progress=False)
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    assert linears and all(not m._forward_hooks for m in linears)
    assert {type(m) for m in model.modules()} == {type(m) for m in tiny_model("llama").modules()}


def test_peft_lora_layers_inside_the_blocks_leave_the_plan_semantics_intact():
    """peft wraps the Linears inside the hooked modules: under cqil_semantics the adapted model computes
    the plan on the adapted weights, the same as after merging."""
    from peft.tuners.lora import Linear as LoraLinear

    from cqil_fx.eager.distill import ADAPTER, _Adapters, _lora_config

    model, ids = fresh(), tokens(seed=5)
    adapters = _Adapters(model, _lora_config(model, sorted(TRAINED), 2, None))
    assert {i for i, layer in enumerate(decoder_layers(model))
            if any(isinstance(m, LoraLinear) for m in layer.modules())} == TRAINED
    with torch.no_grad():
        for layer in adapters.layers().values():
            torch.nn.init.normal_(layer.lora_B[ADAPTER].weight, std=0.2)
        adapted = cqil_reference(model, PLAN, ids, use_cache=False).logits
        adapters.merge()
        merged = cqil_reference(model, PLAN, ids, use_cache=False).logits
        original = cqil_reference(tiny_model("llama"), PLAN, ids, use_cache=False).logits
    assert relative_error(adapted, merged) < 1e-5
    assert relative_error(merged, original) > 1e-2  # the adapters matter: the check is not vacuous


def test_lora_on_blocks_without_linear_layers_is_refused():
    from cqil_fx.errors import CQILUnsupportedError

    with pytest.raises(CQILUnsupportedError, match=r"have none \(GPT2Block\); use method='full'"):
        distill_plan(tiny_model("gpt2"), CONFIG, TRAIN, steps=1, method="lora", progress=False)  # Conv1D, not Linear


def test_explicit_blocks_train_only_those():
    teacher = fresh()
    model = recover(teacher, CONFIG, TRAIN, steps=3, blocks=[4, 7], lr=3e-3, progress=False)
    assert changed_blocks(model, teacher) == {4, 7}


def test_hook_gradients_equal_the_compiled_backends():
    """The student trains through cqil_semantics hooks; the backend's graph must give the same gradients."""
    ids = TRAIN[0]
    config = CQILConfig(start=2, end=6, parallel=2, bypass=1, inner="aot_eager", mode="local")
    grads = []
    for run in ("reference", "compiled"):
        model = fresh()
        decoder_layers(model)[3].requires_grad_(True)
        if run == "reference":
            with cqil_semantics(model, PLAN):
                out = model(ids, use_cache=False).logits
        else:
            out = torch.compile(model, backend=make_backend(config))(ids, use_cache=False).logits
        out.square().mean().backward()
        grads.append(torch.cat([p.grad.flatten() for p in decoder_layers(model)[3].parameters()]))
    assert grads[0].norm() > 0
    assert relative_error(grads[1], grads[0]) < 1e-5


def test_hidden_term_compares_each_groups_output_with_the_teachers_residual_stream():
    """_HiddenMatch against the models' own hidden_states: the student's under the plan, the teacher's plain."""
    teacher, student, ids = fresh(), fresh(), TRAIN[0]
    with torch.no_grad():
        decoder_layers(student)[3].mlp.down_proj.weight.mul_(1.5)  # the two models differ in a grouped block
        expected_states = teacher(ids, use_cache=False, output_hidden_states=True).hidden_states
        with cqil_semantics(student, PLAN), _HiddenMatch(teacher, student, PLAN) as match:
            states = student(ids, use_cache=False, output_hidden_states=True).hidden_states
            measured = match.loss(ids)
    terms = [((states[i + 1] - expected_states[i + 1]).square().sum(-1)
              / expected_states[i + 1].square().sum(-1)).mean() for i in (3, 5)]  # the groups' last blocks
    assert measured.item() == pytest.approx(sum(terms).item() / 2, rel=1e-5)
    assert measured > 0


def test_hidden_weight_trains_the_groups_towards_the_teachers_residual_stream():
    teacher = fresh()

    def layer_wise(model):
        with torch.no_grad(), cqil_semantics(model, PLAN), _HiddenMatch(teacher, model, PLAN) as match:
            losses = []
            for ids in TRAIN:
                model(ids, use_cache=False)
                losses.append(match.loss(ids).item())
        return sum(losses) / len(losses)

    kwargs = dict(steps=12, lr=3e-3, top_k=32, progress=False)
    plain = distill_plan(teacher, CONFIG, TRAIN, **kwargs).model
    layered = distill_plan(teacher, CONFIG, TRAIN, hidden_weight=10.0, **kwargs).model
    assert layer_wise(layered) < 0.8 * layer_wise(plain), (layer_wise(plain), layer_wise(layered))  # 0.08 vs 0.23
    assert changed_blocks(layered, teacher) == TRAINED


def test_top_k_kl_is_the_full_kl_when_k_covers_the_vocabulary():
    g = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(2, 5, VOCAB, generator=g), torch.randn(2, 5, VOCAB, generator=g)
    teacher_logp = torch.log_softmax(teacher, -1)
    full = torch.nn.functional.kl_div(torch.log_softmax(student, -1), teacher_logp, log_target=True,
                                      reduction="none").sum(-1).mean()
    values, indices = teacher_logp.topk(VOCAB, -1)
    assert distillation_kl(student, teacher_logp) == pytest.approx(full.item(), rel=1e-5)
    assert distillation_kl(student, values, indices) == pytest.approx(full.item(), rel=1e-4)
    values, indices = teacher_logp.topk(8, -1)
    assert 0 < distillation_kl(student, values, indices) < full  # a coarsening can only lose divergence


def test_seeded_runs_are_identical():
    a = recover(fresh(), CONFIG, TRAIN, steps=3, method="lora", rank=2, seed=7, progress=False)
    b = recover(fresh(), CONFIG, TRAIN, steps=3, method="lora", rank=2, seed=7, progress=False)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


def test_early_stop_keeps_the_best_weights():
    teacher = fresh()
    result = distill_plan(teacher, CONFIG, TRAIN, steps=20, lr=5.0, warmup=1, eval_batches=HELD_OUT, eval_every=1,
                     patience=2, progress=False)  # a learning rate that only makes things worse
    assert result.stopped_early and result.steps == 2 and result.best_step == 0
    assert [r.step for r in result.history] == [0, 1, 2]
    assert result.best_perplexity == result.initial_perplexity
    assert result.teacher_perplexity == pytest.approx(perplexity(teacher, HELD_OUT))
    assert changed_blocks(result.model, teacher) == set()


def test_learning_rate_warms_up_linearly_then_decays_by_a_cosine_to_a_tenth_of_the_peak():
    from cqil_fx.eager.distill import _schedule

    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=2.0)
    schedule, lrs = _schedule(optimizer, warmup=4, steps=20), []
    for _ in range(20):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        schedule.step()
    cosine = [0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (s - 3) / 16)) for s in range(4, 20)]
    assert lrs == pytest.approx([2.0 * f for f in [0.25, 0.5, 0.75, 1.0] + cosine], rel=1e-12)
    assert lrs[-1] == pytest.approx(0.2)


def test_texts_are_cut_into_windows_with_the_tokenizer():
    class Chars:  # a character-level tokenizer: enough for the data path
        def __call__(self, text, **kwargs):
            return {"input_ids": [ord(c) % VOCAB for c in text]}

    result = distill_plan(fresh(), CONFIG, ["some text " * 5, "more text"], tokenizer=Chars(), seq_len=16, steps=2,
                     progress=False)
    assert result.steps == 2


def test_save_and_load_round_trip(tmp_path):
    recovered = recover(fresh(), CONFIG, TRAIN, steps=3, lr=3e-3, progress=False)
    save_recovered(recovered, PLAN, tmp_path)
    assert Plan.load(tmp_path / "plan.json") == PLAN
    loaded = fresh()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert load_recovered(loaded, tmp_path, plan=CONFIG) == PLAN
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), recovered.state_dict().values()))


def test_lora_adapters_ship_small_and_load_only_onto_their_base_and_plan(tmp_path):
    from cqil_fx import RecoveredWeightsError
    from cqil_fx.eager.distill import distill_plan, load_adapters, save_adapters

    base = fresh()
    result = distill_plan(base, CONFIG, TRAIN, steps=3, method="lora", rank=2, lr=1e-2, progress=False)
    save_adapters(result, base, tmp_path)
    stored = (tmp_path / "adapter_model.safetensors").stat().st_size
    whole = sum(p.numel() * 4 for i in TRAINED for p in decoder_layers(base)[i].parameters())
    assert stored < whole / 2  # factors, not weights
    loaded = fresh()
    assert load_adapters(loaded, tmp_path, plan=CONFIG) == PLAN
    for a, b in zip(loaded.state_dict().values(), result.model.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)  # the merged model, rebuilt from the factors
    with pytest.raises(RecoveredWeightsError, match="another base model"):
        load_adapters(copy.deepcopy(tiny_model("llama", seed=1)), tmp_path)
    with pytest.raises(RecoveredWeightsError, match="not Plan"):
        load_adapters(fresh(), tmp_path, plan=CQILConfig(start=2, end=6, parallel=2, bypass=0))
    with pytest.raises(RecoveredWeightsError, match="no adapters"):
        save_adapters(distill_plan(base, CONFIG, TRAIN, steps=1, progress=False), base, tmp_path / "full")


def test_saved_adapters_load_with_peft_itself_and_give_the_logits_load_recovered_gives(tmp_path):
    from peft import PeftModel
    from peft.functional import set_peft_model_state_dict
    from safetensors.torch import load_file

    from cqil_fx.eager.distill import save_adapters

    base, ids = fresh(), tokens(seed=5)
    result = distill_plan(base, CONFIG, TRAIN, steps=3, method="lora", rank=2, lr=1e-2, progress=False)
    save_adapters(result, base, tmp_path)
    assert {p.name for p in tmp_path.iterdir()} == {"adapter_config.json", "adapter_model.safetensors", "plan.json"}
    ours = fresh()
    assert load_recovered(ours, tmp_path) == PLAN
    peft_model = PeftModel.from_pretrained(fresh(), tmp_path)
    with torch.no_grad():
        expected = cqil_reference(ours, PLAN, ids, use_cache=False).logits
        with cqil_semantics(peft_model.get_base_model(), PLAN):  # the adapters unmerged, beside the weights
            unmerged = peft_model(input_ids=ids, use_cache=False).logits
    assert relative_error(unmerged, expected) < 1e-5
    assert relative_error(expected, cqil_reference(base, PLAN, ids, use_cache=False).logits) > 1e-3
    merged = peft_model.merge_and_unload()  # peft's merge is the one load_recovered runs: the same numbers
    assert all(torch.equal(a, b) for a, b in zip(merged.state_dict().values(), ours.state_dict().values()))
    # the bare-model route: inject, then set the factors from the file (keys without PeftModel's prefix)
    from peft import LoraConfig, inject_adapter_in_model

    bare = inject_adapter_in_model(LoraConfig.from_pretrained(tmp_path), fresh())
    stored = load_file(tmp_path / "adapter_model.safetensors")
    factors = {k.removeprefix("base_model.model."): v for k, v in stored.items()}
    assert not set_peft_model_state_dict(bare, factors).unexpected_keys
    with torch.no_grad():
        assert torch.equal(cqil_reference(bare, PLAN, ids, use_cache=False).logits, unmerged)


def test_adapters_of_the_format_before_peft_still_load_and_convert_to_the_same_numbers(tmp_path):
    """cqil_fx.adapters/1: the factors under '<weight name>.lora_A/B', the scale in the metadata."""
    from safetensors.torch import save_file

    from cqil_fx.eager.distill import _legacy_fingerprint, convert_adapters

    base, ids = fresh(), tokens(seed=5)
    result = distill_plan(base, CONFIG, TRAIN, steps=3, method="lora", rank=2, lr=1e-2, progress=False)
    tensors = {f"{name}.{factor}": t for name, (a, b) in result.adapters.items()
               for factor, t in (("lora_A", a), ("lora_B", b))}
    metadata = {"format": "cqil_fx.adapters/1", "plan": PLAN.to_json(), "scale": repr(result.adapter_scale),
                "base": _legacy_fingerprint(base)}
    save_file(tensors, str(tmp_path / "adapters.safetensors"), metadata=metadata)
    PLAN.save(tmp_path / "plan.json")
    before = fresh()
    assert load_recovered(before, tmp_path) == PLAN
    with torch.no_grad():  # what the loader before peft computed: W += scale * (B @ A)
        by_hand = fresh()
        own = dict(by_hand.named_parameters())
        for name, (a, b) in result.adapters.items():
            own[name] += result.adapter_scale * (b @ a)
    assert all(torch.equal(a, b) for a, b in zip(before.state_dict().values(), by_hand.state_dict().values()))
    with pytest.raises(RecoveredWeightsError, match="another base model"):
        convert_adapters(copy.deepcopy(tiny_model("llama", seed=1)), tmp_path)
    convert_adapters(fresh(), tmp_path)
    assert {p.name for p in tmp_path.iterdir()} == {"adapter_config.json", "adapter_model.safetensors", "plan.json"}
    after = fresh()
    assert load_recovered(after, tmp_path) == PLAN
    with torch.no_grad():
        assert torch.equal(cqil_reference(after, PLAN, ids, use_cache=False).logits,
                           cqil_reference(before, PLAN, ids, use_cache=False).logits)
    with pytest.raises(RecoveredWeightsError, match="adapters.safetensors does not exist"):
        convert_adapters(fresh(), tmp_path)


def test_a_corrected_plan_trains_under_its_corrections_and_ships_with_them(tmp_path):
    from cqil_fx.eager.correction import fit_corrections
    from cqil_fx.eager.distill import load_adapters, save_adapters

    base = fresh()
    corrected = fit_corrections(base, PLAN, TRAIN, low_rank=4)
    assert corrected.corrections and corrected != PLAN
    result = distill_plan(base, corrected, TRAIN, steps=3, method="lora", rank=2, lr=1e-2, eval_batches=HELD_OUT,
                          progress=False)
    assert result.plan == corrected
    # step 0 is the corrected plan, not the plain one: the student starts from the correction
    assert result.history[0].perplexity == pytest.approx(perplexity(base, HELD_OUT, plan=corrected), rel=1e-6)
    assert result.history[0].perplexity != pytest.approx(perplexity(base, HELD_OUT, plan=PLAN), rel=1e-3)
    save_adapters(result, base, tmp_path)
    assert Plan.load(tmp_path / "plan.json") == corrected
    loaded = fresh()
    assert load_adapters(loaded, tmp_path) == corrected
    with pytest.raises(RecoveredWeightsError, match="not Plan"):
        load_adapters(fresh(), tmp_path, plan=PLAN)  # the same groups without the correction: another plan
    ids = tokens(seed=5)
    config = CQILConfig(plan=corrected, inner="aot_eager")
    with torch.no_grad():
        compiled = torch.compile(loaded, backend=make_backend(config))(ids, use_cache=False).logits
        expected = cqil_reference(result.model, corrected, ids, use_cache=False).logits
    assert relative_error(compiled, expected) < 1e-5


def int8_weights(model):
    """``model`` with torchao's weight-only int8 Linears (QLoRA's base); skips where torchao is missing."""
    pytest.importorskip("torchao")
    from torchao.quantization import Int8WeightOnlyConfig, quantize_

    quantize_(model, Int8WeightOnlyConfig())
    return model


def test_qlora_trains_float32_adapters_beside_frozen_int8_weights(tmp_path):
    from peft.tuners.lora.torchao import TorchaoLoraLinear

    from cqil_fx.errors import CQILUnsupportedError

    teacher = int8_weights(fresh())
    result = distill_plan(teacher, CONFIG, TRAIN, steps=12, method="lora", lr=1e-2, rank=4, top_k=32, progress=False)
    before = kl_to_teacher(int8_weights(fresh()), teacher, PLAN, TRAIN)
    after = kl_to_teacher(result.model, teacher, PLAN, TRAIN)
    assert after < 0.8 * before, (before, after)
    adapted = {name: m for name, m in result.model.named_modules() if isinstance(m, TorchaoLoraLinear)}
    assert {int(name.split(".")[2]) for name in adapted} == TRAINED  # model.layers.<i>.…
    originals = dict(teacher.named_modules())
    for name, layer in adapted.items():
        weight = layer.get_base_layer().weight
        assert type(weight).__name__ == "Int8Tensor" and not weight.requires_grad
        assert torch.equal(weight.dequantize(), originals[name].weight.dequantize())  # frozen, still int8
        assert layer.lora_A["default"].weight.dtype == layer.lora_B["default"].weight.dtype == torch.float32
    assert not any(p.requires_grad for p in result.model.parameters())
    with pytest.raises(CQILUnsupportedError, match="method='full' on quantized weights"):
        distill_plan(teacher, CONFIG, TRAIN, steps=1, progress=False)


def test_qlora_adapters_load_onto_the_int8_model_with_cqil_fx_peft_and_the_backend(tmp_path):
    from peft import PeftModel

    from cqil_fx.eager.distill import save_adapters

    base, ids = int8_weights(fresh()), tokens(seed=5)
    result = distill_plan(base, CONFIG, TRAIN, steps=3, method="lora", lr=1e-2, rank=2, progress=False)
    save_adapters(result, base, tmp_path)
    ours = int8_weights(fresh())
    assert load_recovered(ours, tmp_path) == PLAN
    peft_model = PeftModel.from_pretrained(int8_weights(fresh()), tmp_path)
    config = CQILConfig(start=2, end=6, parallel=2, bypass=1, inner="aot_eager")
    with torch.no_grad():
        expected = cqil_reference(result.model, PLAN, ids, use_cache=False).logits
        with cqil_semantics(peft_model.get_base_model(), PLAN):
            by_peft = peft_model(input_ids=ids, use_cache=False).logits
        compiled = torch.compile(ours, backend=make_backend(config))(ids, use_cache=False).logits
        assert torch.equal(cqil_reference(ours, PLAN, ids, use_cache=False).logits, expected)
    assert relative_error(by_peft, expected) < 1e-6
    assert relative_error(compiled, expected) < 1e-5
    assert relative_error(expected, cqil_reference(base, PLAN, ids, use_cache=False).logits) > 1e-3


def test_loading_for_another_plan_warns(tmp_path):
    save_recovered(fresh(), PLAN, tmp_path)
    with pytest.warns(PlanMismatchWarning, match="recovered for Plan.*loaded for Plan"):
        load_recovered(fresh(), tmp_path, plan=CQILConfig(start=2, end=6, parallel=2, bypass=0))


def test_compiled_recovered_model_equals_the_reference_on_its_weights():
    recovered = recover(fresh(), CONFIG, TRAIN, steps=4, lr=3e-3, progress=False)
    ids = tokens(seed=5)
    config = CQILConfig(start=2, end=6, parallel=2, bypass=1, inner="aot_eager")
    with torch.no_grad():
        compiled = torch.compile(recovered, backend=make_backend(config))(ids, use_cache=False).logits
        expected = cqil_reference(recovered, PLAN, ids, use_cache=False).logits
        original = cqil_reference(tiny_model("llama"), PLAN, ids, use_cache=False).logits
    assert relative_error(compiled, expected) < 1e-5
    assert relative_error(original, expected) > 1e-3  # training changed the output: the check is not vacuous


@pytest.mark.parametrize("kwargs, match", [
    (dict(method="qlora"), "method='qlora' is unknown"),
    (dict(steps=0), "steps=0 must be a positive int"),
    (dict(top_k=0), "top_k=0"),
    (dict(hidden_weight=-1.0), "hidden_weight=-1.0 must be >= 0"),
    (dict(blocks=[9]), r"blocks=\[9\] are out of range"),
    (dict(data=[]), "no training data"),
    (dict(data=["text"]), "need tokenizer="),
    (dict(data=[torch.randn(1, 8)]), "is not a .batch, tokens. tensor of token ids"),
    (dict(plan=CQILConfig(groups=[[1]])), "nothing to train"),
])
def test_bad_input_raises_clear_errors(kwargs, match):
    args = dict(plan=CONFIG, data=TRAIN, steps=1, progress=False) | kwargs
    with pytest.raises(CQILConfigError, match=match):
        distill_plan(tiny_model("llama"), args.pop("plan"), args.pop("data"), **args)


def test_repeated_windows_copy_their_first_half_into_their_second():
    from cqil_fx.tokens import repeated_windows

    windows = [torch.arange(10 * i, 10 * i + 9).reshape(1, 9) for i in range(4)]
    repeated = repeated_windows(windows, 0.5, seed=3)
    assert len(repeated) == 2 and repeated == sorted(repeated, key=lambda w: w[0, 0].item())  # in window order
    for window in repeated:
        assert window.shape == (1, 8) and torch.equal(window[:, :4], window[:, 4:])
        assert any(torch.equal(window[:, :4], w[:, :4]) for w in windows)
    assert repeated_windows(windows, 0.0) == [] and len(repeated_windows(windows, 1.0)) == 4
    with pytest.raises(CQILConfigError, match="in \\[0, 1\\], got 1.5"):
        repeated_windows(windows, 1.5)


def test_bad_recovered_weights_raise_clear_errors(tmp_path):
    with pytest.raises(RecoveredWeightsError, match="does not exist"):
        load_recovered(fresh(), tmp_path)
    save_recovered(fresh(), PLAN, tmp_path)
    with pytest.raises(RecoveredWeightsError, match="which this model does not have"):
        load_recovered(fresh("gpt2"), tmp_path)


def test_cli_reports_bad_plans_as_errors(capsys, tmp_path):
    for argv, message in [(["--start", "12", "--end", "27"], "(end - start) = 15"),
                          ([], "name the plan to recover once"),
                          (["--start", "12", "--end", "28", "--plan", "p.json"], "name the plan to recover once"),
                          (["--plan", str(tmp_path / "missing.json")], "missing.json"),
                          (["--plan", "p.json", "--parallel", "4"], "--parallel 4 describe groups to make"),
                          (["--start", "12", "--end", "28", "--self-openings", "varied"], "--data python does not use"),
                          (["--start", "12", "--end", "28", "--repeats", "1.5"], "--repeats 1.5: a fraction"),
                          (["--start", "12", "--end", "28", "--hidden-weight", "-1"], "--hidden-weight -1.0: a weight"),
                          (["--start", "12", "--end", "28", "--text-tokens", "512"], "of the files --text names"),
                          (["--start", "12", "--end", "28", "--text", str(tmp_path / "nothing")],
                           "nothing: no such file")]:
        with pytest.raises(SystemExit) as e:
            cli_main(["recover", *argv, "--out", "unused"])
        assert e.value.code == 2
        err = capsys.readouterr().err
        assert "cqil-fx: error: " in err and message in err, err
    with pytest.raises(SystemExit) as e:  # argparse's own error, from the option's type
        cli_main(["recover", "--start", "12", "--end", "28", "--train-blocks", "all", "--out", "unused"])
    assert e.value.code == 2
    assert "argument --train-blocks: 'all': write groups as FIRST-LAST" in capsys.readouterr().err


def test_quality_report_shows_recovered_rows(tmp_path):
    plan = CQILConfig(start=12, end=28).plan_for(30)
    rows = [Row("original", "original", 0, "", 10.0), Row("uniform S12-E28 P2 D0", "cqil", 8, "", 20.0),
            Row("remove 8 blocks", "removal", 8, "", 50.0),
            Row(f"recovered {plan_label(plan)}", "recovered", 8, repr(plan), 10.5)]
    write_report(rows, SimilarityReport(torch.eye(3), tokens=1), tmp_path, "cqil-fx eval --recovered r",
                 {"calibration": 1, "evaluation": 2})
    table = (tmp_path / "quality.md").read_text()
    assert "| recovered S12-E28 P2 D0 | recovered | 8 |  | 10.50 | +5.0% |" in table
    assert "* recovered S12-E28 P2 D0 (distilled): saves 8 block-times at +5.0% held-out perplexity " \
           "(target: <= +5%): met" in table
    assert plan_label(CQILConfig(groups=[[3, 4], [8, 9]], bypass=1).plan_for(30)) == "[3-4] [8-9] D1"


def test_run_recovery_writes_weights_and_summary_that_eval_can_load(tmp_path):
    from cqil_fx.tools.cli import _recovered_models
    from cqil_fx.eager.distill import run_recovery

    summary = run_recovery(fresh(), CONFIG, TRAIN, HELD_OUT, HELD_OUT, tmp_path, command="test", steps=2,
                           lr=3e-3, eval_every=1, progress=False)
    assert set(summary["perplexity"]) == {"original", "cqil", "recovered"}
    assert Plan.from_dict(summary["plan"]) == PLAN and summary["plan_repr"] == repr(PLAN)
    assert [r["step"] for r in summary["history"]] == [0, 1, 2]
    assert (tmp_path / "recovery.json").is_file() and (tmp_path / "recovered.safetensors").is_file()
    [(model, plan)] = _recovered_models(fresh(), [str(tmp_path)])
    assert plan == PLAN
    assert perplexity(model, HELD_OUT, plan=plan) == pytest.approx(summary["perplexity"]["recovered"], rel=1e-6)


@pytest.mark.parametrize("name", ["int4-weight-only", "int8-dynamic"])
def test_lora_through_weights_without_a_gradient_is_refused_naming_them(name):
    """torch has no backward for the CPU int4 kernel, and activations quantized per call carry none: LoRA
    training through such weights is refused before any step, naming the weight and its type."""
    pytest.importorskip("torchao")
    from cqil_fx.errors import CQILUnsupportedError
    from cqil_fx.tools.quant import quantize

    model = quantize(fresh(), name)
    with pytest.raises(CQILUnsupportedError, match=r"method='lora' on (Int4OpaqueTensor|Int8Tensor with dynamic)"):
        distill_plan(model, CONFIG, TRAIN, steps=1, method="lora", progress=False)

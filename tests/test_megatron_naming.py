"""Canonical names (refit_engine.megatron.Naming) on module trees shaped like megatron-core's,
including structures this machine's megatron-core does not build: 0.19's MTP layers
(`mtp.layers.{i}.mtp_model_layer.`) with TE grouped experts (`linear_fc1.weight{k}`)."""

import pytest

torch = pytest.importorskip("torch")

from torch import nn  # noqa: E402

from refit_engine.errors import RefitError  # noqa: E402
from refit_engine.megatron import Naming  # noqa: E402


class _Linear(nn.Module):
    def __init__(self, *names):
        super().__init__()
        for name in names:
            self.register_parameter(name, nn.Parameter(torch.zeros(2, 2)))


class _SequentialExperts(nn.Module):  # SequentialMLP: local_experts.{k}.linear_fc{1,2}.weight
    def __init__(self, local):
        super().__init__()
        self.num_local_experts = local
        self.local_experts = nn.ModuleList(
            nn.ModuleDict({"linear_fc1": _Linear("weight"), "linear_fc2": _Linear("weight")})
            for _ in range(local))


class _GroupedExperts(nn.Module):  # TEGroupedMLP: linear_fc{1,2}.weight{k}
    def __init__(self, local, single=False):
        super().__init__()
        self.num_local_experts = local
        names = ["weight"] if single else [f"weight{k}" for k in range(local)]
        self.linear_fc1, self.linear_fc2 = _Linear(*names), _Linear(*names)


class _MoE(nn.Module):
    def __init__(self, indices, experts):
        super().__init__()
        self.local_expert_indices = list(indices)
        self.experts = experts
        self.shared_experts = nn.ModuleDict({"linear_fc1": _Linear("weight")})


class _Layer(nn.Module):
    def __init__(self, layer_number, mlp):
        super().__init__()
        self.layer_number = layer_number
        self.input_layernorm = _Linear("weight")
        self.mlp = mlp


class _MTPLayer(nn.Module):
    def __init__(self, layer_number, inner_name, inner):
        super().__init__()
        self.layer_number = layer_number
        self.eh_proj = _Linear("weight")
        setattr(self, inner_name, inner)


def _model(inner_name, grouped):
    """Pipeline stage 2 of 2 (global layers 2, 3) on EP rank 1 of 2 (experts 4-7 of 8)."""
    def experts():
        return _GroupedExperts(4) if grouped else _SequentialExperts(4)
    model = nn.Module()
    model.decoder = nn.Module()
    model.decoder.layers = nn.ModuleList([_Layer(3, _MoE(range(4, 8), experts())),
                                          _Layer(4, _MoE(range(4, 8), experts()))])
    model.mtp = nn.Module()
    model.mtp.layers = nn.ModuleList(
        [_MTPLayer(1, inner_name, _Layer(1, _MoE(range(4, 8), experts())))])
    return model


@pytest.mark.parametrize("inner_name", ["transformer_layer", "mtp_model_layer"])  # 0.16 / 0.19
@pytest.mark.parametrize("grouped", [False, True])
def test_experts_of_decoder_and_mtp_layers_get_global_indices(inner_name, grouped):
    model = _model(inner_name, grouped)
    naming = Naming(model)
    names = {naming.canonical(n) for n, _ in model.named_parameters()}
    for layer in (2, 3):
        assert f"decoder.layers.{layer}.input_layernorm.weight" in names
        assert f"decoder.layers.{layer}.mlp.shared_experts.linear_fc1.weight" in names
    mtp = f"mtp.layers.0.{inner_name}.mlp"
    for prefix in ("decoder.layers.2.mlp", "decoder.layers.3.mlp", mtp):
        for expert in range(4, 8):
            for fc in ("linear_fc1", "linear_fc2"):
                assert f"{prefix}.experts.{expert}.{fc}.weight" in names, (prefix, sorted(names))
    assert not any("local_experts" in n or n.endswith(("weight0", "weight3")) for n in names)
    assert naming.expert_prefix(f"{mtp}.experts.linear_fc1.weight0" if grouped else
                                f"{mtp}.experts.local_experts.0.linear_fc1.weight")
    assert naming.expert_prefix(f"{mtp}.shared_experts.linear_fc1.weight") is None


def test_grouped_expert_parameters_without_an_index_are_refused():
    model = nn.Module()
    model.decoder = nn.Module()
    model.decoder.layers = nn.ModuleList([_Layer(1, _MoE(range(2), _GroupedExperts(2, True)))])
    naming = Naming(model)
    with pytest.raises(RefitError, match="one grouped parameter"):
        naming.canonical("decoder.layers.0.mlp.experts.linear_fc1.weight")


def test_experts_module_without_moe_parent_uses_its_ep_rank():
    model = nn.Module()
    model.experts = _SequentialExperts(2)  # no ep_group: EP1, experts 0 and 1
    assert Naming(model).canonical("experts.local_experts.1.linear_fc2.weight") == \
        "experts.1.linear_fc2.weight"

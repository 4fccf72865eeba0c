"""A patched linear still answers .weight / .bias with the base layer's tensors (as PEFT's layers
do), without adding anything to the state dict."""
import fastadapters as fa
from tiny_models import tiny_model


def test_weight_and_bias_pass_through_to_the_base_layer():
    model = tiny_model("opt")  # opt's projections carry biases
    keys = set(model.state_dict())
    q = model.model.decoder.layers[0].self_attn.q_proj
    w, b = q.weight, q.bias
    fa.patch(model, adapter="lora", r=2)
    wrapped = model.model.decoder.layers[0].self_attn.q_proj
    assert wrapped is not q and wrapped.weight is w and wrapped.bias is b
    fa.unpatch(model)
    assert set(model.state_dict()) == keys

"""Target matching never reaches into fastadapters' own prefix encoder."""
import pytest

import fastadapters as fa
from tiny_models import tiny_model


def test_lora_targets_skip_prefix_encoder_linears():
    model = tiny_model("llama")
    fa.patch(model, adapter="prefix", num_virtual_tokens=2, prefix_projection=True, encoder_hidden_size=8)
    # "transform.0" / "transform.2" name the encoder's own Linear layers: never targets
    with pytest.raises(ValueError, match="matched no module"):
        fa.patch(model, adapter="lora", name="l", target_modules=["transform.0", "transform.2"])
    fa.patch(model, adapter="lora", name="l2", r=2)
    assert all(not p.startswith("fastadapters_prefix") for p in model._fastadapters.kinds["l2"])

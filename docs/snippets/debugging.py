import jaxtyping

# Check every flowlm call against its shape annotations. Install the hook before flowlm is
# first imported (e.g. at the top of your training script or in conftest.py).
jaxtyping.install_import_hook("flowlm", "beartype.beartype")

import torch  # noqa: E402

import flowlm as fl  # noqa: E402

interp = fl.LinearInterpolant(reparam=fl.TokenAccuracy(4))
x1 = fl.one_hot(torch.tensor([[0, 1, 2]]), 4)  # (batch=1, seq=3, vocab=4)
t = torch.rand(2)  # a bug: two times for a batch of one
try:
    interp.sample(torch.randn_like(x1), x1, t)
except jaxtyping.TypeCheckError as error:
    print(error)
else:
    raise AssertionError("the shape check did not fire")

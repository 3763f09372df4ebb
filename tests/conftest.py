import tempfile

import pytest
import torch

from fxmerge.yolo import offline

torch.set_num_threads(2)
# ultralytics (imported by some tests) reads these once, at import: off the network, with
# a settings folder of its own holding the fonts it would fetch
offline(tempfile.mkdtemp(prefix="fxmerge-ultralytics-"))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)

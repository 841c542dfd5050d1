"""Table 2 baselines (docs/paper.md section 4), one file each, all with Climber's contract: built
from a `ModelConfig`, the same SUMI batch in, logits (B, M, T) out, `item_features` /
`user_features` buffers, `param_counts()` and `flops(L, M)`. `climber.model.make_model`
picks one by `ModelConfig.arch`."""

from torch import nn

from climber.baselines.din import DIN
from climber.baselines.dlrm import DLRM
from climber.baselines.hstu import HSTU
from climber.baselines.transformer import Transformer
from climber.baselines.twin import TWIN

BASELINES: dict[str, type[nn.Module]] = {"dlrm": DLRM, "din": DIN, "twin": TWIN, "transformer": Transformer,
                                         "hstu": HSTU}

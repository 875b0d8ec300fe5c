"""Run by test_sharded.py under `torchrun --nproc_per_node 2` (gloo): the start-up probe's verdict is one for
all ranks. Writes OUT/rank{r}.json with what each rank chose or raised.

    torchrun --nproc_per_node 2 tests/distributed/dist_probe.py OUT disagree  # rank 1's model refuses varlen
    torchrun --nproc_per_node 2 tests/distributed/dist_probe.py OUT oom  # rank 1 runs out of memory (RLIMIT_AS)
"""

import json
import logging
import resource
import sys
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from trl.trainer.utils import add_fused_lm_head  # noqa: E402

from fastdpo.probe import ProbeOutOfMemory, choose, scheme_name  # noqa: E402
from fastdpo.trainer import candidate_schemes  # noqa: E402
from tests import archs  # noqa: E402


def main(out: Path, case: str) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    if case == "disagree":
        # Gemma 3 with bidirectional attention: fastdpo.segattn refuses it (Unsupported), the model's mask is exact
        model = archs.build("gemma3", "sdpa", use_bidirectional_attention=rank == 1)
    else:
        # a 200k vocabulary: the probe's gradient of the embedding (51 MB) and its logits need large allocations
        model = archs.build("llama", "sdpa", vocab_size=200_000)
    add_fused_lm_head(model)
    schemes = candidate_schemes("sdpa", 0, SimpleNamespace(max_length=64, truncation_mode="keep_start",
                                                           prefix_sharing=True))
    result = {}
    if case == "oom" and rank == 1:
        # 32 MB more address space: threads and small buffers fit, the probe's large tensors fail as they would on
        # a full device
        used = int(Path("/proc/self/statm").read_text().split()[0]) * resource.getpagesize()
        resource.setrlimit(resource.RLIMIT_AS, (used + 32 * 2**20, resource.RLIM_INFINITY))
    try:
        chosen = choose(model, schemes, device=torch.device("cpu"))
        result["scheme"] = scheme_name(chosen) if chosen is not None else None
    except ProbeOutOfMemory as e:
        result["oom"] = str(e)
    if case == "oom" and rank == 1:
        resource.setrlimit(resource.RLIMIT_AS, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
    (out / f"rank{rank}.json").write_text(json.dumps(result))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    out = Path(sys.argv[1])
    out.mkdir(parents=True, exist_ok=True)
    main(out, sys.argv[2])

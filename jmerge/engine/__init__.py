"""The merge engine: a mergekit YAML -> a merged Hugging Face directory.

The data path, module by module:

    config.load_plan     YAML -> MergePlan (reader: its sections; plan: the types)
    inputs.check_plan    the models opened (headers only) and checked against each other and the
                         plan; jobs.resolve expands it into one TensorJob per output tensor,
                         parameters evaluated per tensor (settings)
    prepare.prepare      output config and dtypes, vocabulary (vocab), chat template (template),
                         host-computed parameters
    stream.stream_merge  tensor by tensor from the files to the output files, or
    memory.memory_merge  the inputs on the mesh, merged group by group (groups), each laid out
                         over the devices by split
    footprint            the per-device need of a merge from its lowered programs (lowered),
                         and the mode `auto` picks; abstract: a plan from config.json alone
                         -- both call programs.per_tensor with the same float32 parameters and
                         the same per-tensor key (keys), so both write the same bits; NaN/Inf is
                         flagged in the same program (finite)
    run.merge            the entry point, taking MergeOptions (options)
"""

from jmerge.engine.config import load_plan, parse_plan
from jmerge.engine.inputs import Checked, ModelInput, check, check_plan, open_model
from jmerge.engine.jobs import TensorJob, resolve
from jmerge.engine.options import MergeOptions
from jmerge.engine.plan import MergePlan
from jmerge.engine.footprint import choose_mode, merge_programs
from jmerge.engine.run import MergeResult, merge

__all__ = ["Checked", "MergeOptions", "MergePlan", "MergeResult", "ModelInput", "TensorJob", "check",
           "check_plan", "choose_mode", "load_plan", "merge", "merge_programs", "open_model", "parse_plan",
           "resolve"]

"""The unedited model, evaluated like an erased one: the reference row of docs/erasure.md.

python -m launch.erase --config=configs/erasure/original.py:cpu --workdir=/tmp/original
"""

from configs.erasure import common


def get_config(arg=None):
    arg = common.check_arg(arg)
    return common.base(arg, "erase_original")

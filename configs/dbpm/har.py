"""UCI-HAR (6 activities, 9 inertial channels, 128 steps; 7,352 train / 2,947 test windows), one
of the paper's four data sets, from the unpacked "UCI HAR Dataset" folder under $JAXSAFE_DATA.
Paper: batch 512, 80 epochs, warm-up 50; linear-probe accuracy."""

import os

from configs.dbpm import common


def get_config(arg=None):
    c = common.base(arg)
    c.data.update(
        source="uci_har", dataset="HAR", path=os.path.join(common.data_root(), "UCI HAR Dataset")
    )
    return common.finish(c, cpu_batch=128)

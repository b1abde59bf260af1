import os

# Tests run the notebooks in quick mode (shrunken training) and never touch the network;
# the kernels nbval starts inherit this environment.
os.environ.setdefault("LILLLM_QUICK", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import os

# Tests run the notebooks in quick mode (shrunken training) and never touch the network;
# the kernels nbval starts inherit this environment.
os.environ.setdefault("LILLLM_QUICK", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Under pytest-xdist each worker (and each notebook kernel it starts) gets one thread:
# two workers with two threads each on two cores slow small matmuls down many times over.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("OMP_NUM_THREADS", "1")

"""fastddpm: a fast, tested DDPM / Improved-DDPM engine on PyTorch.

kernels/ installs as fastddpm.kernels and export/ as fastddpm.export (package_dir), so the
repository's top-level layout stays flat while nothing generic lands in site-packages.
"""
from setuptools import setup

setup(
    name="fastddpm",
    version="0.1.0",
    description="Denoising diffusion probabilistic models with Triton kernels, CUDA graphs and ONNX export",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=["fastddpm", "fastddpm.kernels", "fastddpm.export"],
    package_dir={
        "fastddpm": "fastddpm",
        "fastddpm.kernels": "kernels",
        "fastddpm.export": "export",
    },
    package_data={"fastddpm": ["assets/*.safetensors", "assets/*.json"]},
    install_requires=[
        # 2.13 is what CI installs (the CPU build on disk); any recent 2.x works.
        "torch>=2.4",
        "numpy",
        "safetensors",
        "tqdm",
        "pillow",
        "scikit-learn",  # the built-in `digits` data set
    ],
    extras_require={
        # Triton ships with CUDA builds of torch; on CPU hosts it is only needed for the
        # interpreter-mode tests.
        "triton": ["triton"],
        # ONNX export and the onnx backend. Install exactly ONE of [onnx] (CPU ONNX Runtime) or [gpu]
        # (onnxruntime-gpu, which includes the CPU provider): both packages provide the module
        # `onnxruntime` and break each other when installed together.
        "onnx": ["onnx", "onnxruntime"],
        "gpu": ["onnx", "onnxruntime-gpu"],
        # diffusers is the parity peer in tests and benchmarks only (it does not require torch).
        "test": ["pytest", "pytest-benchmark", "triton", "diffusers", "onnx", "onnxruntime", "hypothesis"],
        "bench": ["pytest", "pytest-benchmark", "diffusers"],
        # PNG figures: eval bpd --plot, eval rate-distortion --plot, bench/replicate.py, bench/paper_figures.py.
        "plots": ["matplotlib"],
    },
    entry_points={"console_scripts": ["fastddpm = fastddpm.cli:main"]},
)

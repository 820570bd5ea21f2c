from setuptools import find_packages, setup

setup(
    name="rein-kernels",
    version="0.1.0",
    description="Rein (CVPR 2024) for frozen vision foundation models, with fused Triton kernels",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["rein", "rein.*", "rein_kernels", "rein_kernels.*"]),
    python_requires=">=3.10",
    install_requires=["torch>=2.4", "triton>=3.0", "numpy"],
    extras_require={
        "dev": ["pytest", "pytest-benchmark", "hypothesis", "matplotlib"],
        "timm": ["timm>=1.0"],
        "train": ["timm>=1.0", "matplotlib", "tqdm", "pillow", "opencv-python-headless", "transformers>=5.17,<6", "scipy"],
        "xformers": ["xformers"],
    },
    entry_points={"console_scripts": ["rein-train=rein.train.loop:main", "rein-predict=rein.predict:main",
                                      "rein-evaluate=rein.evaluate:main"]},
)

from setuptools import setup

with open("README.rst", encoding="utf-8") as f:
    long_description = f.read()

setup(
    name="deputy",
    version="0.1.0",
    description="A small, fast, trustworthy job server for Python shops that run gevent",
    long_description=long_description,
    long_description_content_type="text/x-rst",
    license="MIT",
    py_modules=["deputy_server", "deputy_client"],
    python_requires=">=3.9",
    install_requires=["gevent>=23.9", "orjson>=3.9", "docopt-ng>=0.9", "pysimdjson>=6.0; python_version < '3.14'"],
    extras_require={
        "test": ["pytest>=7", "pytest-timeout>=2", "hypothesis>=6", "trustme>=1.0", "prometheus_client>=0.17",
                 "selenium>=4.10"],
    },
    entry_points={
        "console_scripts": [
            "deputy-server = deputy_server:main",
            "deputy-client = deputy_client:main",
        ],
    },
    classifiers=[
        "License :: OSI Approved :: MIT License",
        "Programming Language :: Python :: 3",
        "Framework :: gevent",
    ],
)

"""Packaging: `pip install -e .` gives the `mailproxy` command.

Only the mailproxy/ package and its sub-packages are installed; mailproxy.py
is a launcher for source checkouts and is never installed as a module (it
would shadow the package).
"""

from setuptools import find_packages, setup

setup(
    name="mailproxy",
    version="0.1.0",
    description="An IMAP, POP3 and SMTP proxy in the mould of nginx's mail module",
    packages=find_packages(include=["mailproxy", "mailproxy.*"]),
    python_requires=">=3.10",
    install_requires=["click>=8", "requests>=2.32.2", "crossplane>=0.5", "dnspython>=2.3",
                      "cryptography>=41", "pyOpenSSL>=25"],
    extras_require={"test": ["pytest>=7", "coverage>=7.13", "hypothesis>=6"]},
    entry_points={"console_scripts": ["mailproxy = mailproxy.cli:main"]},
)

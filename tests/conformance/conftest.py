# The conformance harness is run by `python -m tests.conformance.run`, never by the project's own pytest run:
# nothing in this directory is collected or imported (not even for --doctest-modules).
collect_ignore_glob = ["*"]

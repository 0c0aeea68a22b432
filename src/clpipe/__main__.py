import sys

# httpx imports its own command line tool (rich and pygments: about 40 ms at every start)
# unless it cannot; clpipe uses only its Python API (issue 15: start-up cost)
sys.modules.setdefault("httpx._main", None)  # type: ignore[arg-type]  # None: "not importable"

from clpipe.cli import main  # noqa: E402

main()

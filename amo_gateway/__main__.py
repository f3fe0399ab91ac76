"""`python -m amo_gateway` runs the same CLI as the `amo-gateway` console script."""

from amo_gateway.cli import main

raise SystemExit(main())

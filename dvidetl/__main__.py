from dvidetl.cli import main

raise SystemExit(main())

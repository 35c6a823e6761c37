from catdog_hpo.cli import main

raise SystemExit(main())

from medfoundry.cli import main

raise SystemExit(main())

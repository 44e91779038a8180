from cache_tools.cli import main

raise SystemExit(main())

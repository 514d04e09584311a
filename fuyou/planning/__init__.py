"""Planning a run before running it: `fuyou probe` (this machine's rates), the search for the
fastest settings that fit the budgets (`fuyou plan`, `--plan auto`), and `fuyou profile`."""

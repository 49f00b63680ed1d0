pytest_plugins = ["cairn_testkit.fixtures", "cairn_testkit.aio", "cairn_testkit.broker"]

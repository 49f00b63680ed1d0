pytest_plugins = ["cairn_testkit.fixtures"]

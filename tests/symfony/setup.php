<?php
// Declares the topology the way a Symfony application owning it does
// (`messenger:setup-transports`): argv[1] = DSN, argv[2..] = JSON transport options.

declare(strict_types=1);
require __DIR__.'/bootstrap.php';

for ($i = 2; $i < $argc; ++$i) {
    \PulseTest\transport($argv[1], \PulseTest\json_arg($argv, $i))->setup();
}
echo "ok\n";

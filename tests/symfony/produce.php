<?php
// Sends commands to pulsed through Symfony Messenger, with the stamps a message bus adds.
// argv: DSN, JSON transport options, then one JSON object per command:
// {"class": "...", "properties": {...}}.

declare(strict_types=1);
require __DIR__.'/bootstrap.php';

use Symfony\Component\Messenger\Envelope;
use Symfony\Component\Messenger\Stamp\BusNameStamp;

$transport = \PulseTest\transport($argv[1], \PulseTest\json_arg($argv, 2));
for ($i = 3; $i < $argc; ++$i) {
    $spec = \PulseTest\json_arg($argv, $i);
    $message = new $spec['class']();
    foreach ($spec['properties'] as $name => $value) {
        $message->$name = $value;
    }
    $transport->send(new Envelope($message, [new BusNameStamp('command.bus')]));
}
echo "sent\n";

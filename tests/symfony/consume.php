<?php
// Receives pulsed's events through Symfony Messenger and prints one JSON line per decoded
// message: its PHP class, its properties and the AMQP message_id.
// argv: DSN, JSON transport options, count, timeout in seconds.

declare(strict_types=1);
require __DIR__.'/bootstrap.php';

use Symfony\Component\Messenger\Bridge\Amqp\Transport\AmqpReceivedStamp;

[$dsn, $options, $count, $timeout] = [$argv[1], \PulseTest\json_arg($argv, 2), (int) $argv[3], (float) $argv[4]];
$transport = \PulseTest\transport($dsn, $options);
$deadline = microtime(true) + $timeout;
$received = 0;
while ($received < $count) {
    if (microtime(true) > $deadline) {
        fwrite(STDERR, "timed out after $received of $count messages\n");
        exit(1);
    }
    $got = false;
    foreach ($transport->get() as $envelope) {
        $got = true;
        $message = $envelope->getMessage();
        $amqp = $envelope->last(AmqpReceivedStamp::class)->getAmqpEnvelope();
        echo json_encode([
            'class' => get_class($message),
            'properties' => get_object_vars($message),
            'message_id' => $amqp->getMessageId(),
            'content_type' => $amqp->getContentType(),
            'delivery_mode' => $amqp->getDeliveryMode(),
        ], JSON_THROW_ON_ERROR)."\n";
        $transport->ack($envelope);
        ++$received;
    }
    if (!$got) {
        usleep(50000);
    }
}

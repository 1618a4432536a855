<?php
// Test fixtures: a real Symfony Messenger (Debian's php-symfony-messenger and
// php-symfony-amqp-messenger, with the php-amqp extension) talking to pulsed through
// RabbitMQ with the JSON serializer, as a Symfony application configured like
// docs/symfony.md does.

declare(strict_types=1);

namespace App\Message\Pulse {
    // Events pulsed sends. Public properties: Symfony's ObjectNormalizer fills them from
    // the JSON body.
    final class PresenceJoined
    {
        public string $tenantId;
        public string $userId;
        public string $resource;
    }

    final class NotificationCreated
    {
        public string $tenantId;
        public string $userId;
        public int $notificationId;
        public string $title;
    }

    final class JobFailed
    {
        public string $job;
        public int $runId;
        public string $outcome;
        public string $error;
    }
}

namespace App\Message\Pulse\Command {
    // Commands Symfony sends to pulsed; each carries its own id (Messenger sets none).
    final class ChangeSetting
    {
        public string $commandId;
        public string $key;
        /** @var string|int|bool */
        public $value;
        public ?string $actor = null;
    }

    final class EndPresence
    {
        public string $commandId;
        public string $tenantId;
        public string $userId;
    }
}

namespace PulseTest {
    require_once '/usr/share/php/Symfony/Component/Messenger/autoload.php';
    require_once '/usr/share/php/Symfony/Component/Serializer/autoload.php';
    require_once '/usr/share/php/Symfony/Component/PropertyAccess/autoload.php';

    use Symfony\Component\Messenger\Bridge\Amqp\Transport\AmqpTransport;
    use Symfony\Component\Messenger\Bridge\Amqp\Transport\Connection;
    use Symfony\Component\Messenger\Transport\Serialization\Serializer;
    use Symfony\Component\Serializer\Encoder\JsonEncoder;
    use Symfony\Component\Serializer\Normalizer\ArrayDenormalizer;
    use Symfony\Component\Serializer\Normalizer\DateTimeNormalizer;
    use Symfony\Component\Serializer\Normalizer\ObjectNormalizer;

    /**
     * An AMQP transport with the JSON serializer (messenger.transport.symfony_serializer):
     * the normalizers of Serializer::create(), without its XML encoder (which would need
     * php-xml and plays no part in JSON).
     */
    function transport(string $dsn, array $options): AmqpTransport
    {
        $serializer = new Serializer(new \Symfony\Component\Serializer\Serializer(
            [new DateTimeNormalizer(), new ArrayDenormalizer(), new ObjectNormalizer()],
            [new JsonEncoder()],
        ));

        return new AmqpTransport(Connection::fromDsn($dsn, $options), $serializer);
    }

    /** Reads the JSON argument vector entry $i. */
    function json_arg(array $argv, int $i): array
    {
        $v = json_decode($argv[$i] ?? '', true, 512, JSON_THROW_ON_ERROR);
        if (!is_array($v)) {
            fwrite(STDERR, "argument $i must be a JSON object\n");
            exit(2);
        }
        return $v;
    }
}

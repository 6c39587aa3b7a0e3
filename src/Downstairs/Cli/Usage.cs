namespace NbdServer.Downstairs.Cli;

/// <summary>Help texts, written like man pages.</summary>
internal static class Usage
{
    public const string Main = """
NAME
    nbd-downstairs - durable block storage server (one replica of an nbd-server volume)

SYNOPSIS
    nbd-downstairs create --data DIR --size SIZE [--block-size 512|4096] [--extent-size BLOCKS] [--preallocate]
    nbd-downstairs run    --data DIR --listen ADDRESS:PORT [OPTIONS]
    nbd-downstairs info   --data DIR
    nbd-downstairs compare DIR DIR [DIR...]
    nbd-downstairs COMMAND --help

DESCRIPTION
    A downstairs keeps one region (a block device image split into extent files) on local disk and
    serves it to the replica engine over TCP. Every write is checked against its hash, every IO
    error is reported in the reply of the job that hit it, and a flush makes the written data
    durable (fdatasync) before it is acknowledged. See docs/downstairs.md.

EXIT STATUS
    0 success, 1 runtime error (damaged region, IO error, address in use), 2 usage error.
""";

    public const string Create = """
NAME
    nbd-downstairs create - make a new, empty region

SYNOPSIS
    nbd-downstairs create --data DIR --size SIZE [--block-size 512|4096] [--extent-size BLOCKS] [--preallocate]

OPTIONS
    --data DIR             Directory for the region (created if missing; must not hold a region).
    --size SIZE            Region size: 512, 64K, 1.5MiB, 8GiB... A whole number of extents.
    --block-size N         512 or 4096 (default 4096).
    --extent-size BLOCKS   Blocks per extent (default: 32 MiB worth, or the whole region if smaller).
                           An extent is the unit of flush bookkeeping and of live repair.
    --preallocate          Allocate every extent file now (fallocate) instead of leaving them
                           sparse. Overwrites then cannot hit ENOSPC, at the cost of the full size
                           on disk up front. Default: sparse (thin), see docs/downstairs.md.

FILES
    DIR/region.meta, DIR/region.lock, DIR/extents/eNNNNNN.dat
""";

    public const string Run = """
NAME
    nbd-downstairs run - serve a region to the replica engine

SYNOPSIS
    nbd-downstairs run --data DIR --listen ADDRESS:PORT [OPTIONS]

DESCRIPTION
    Opens the region (refusing a damaged one with the name of the file at fault, changing
    nothing), logs "Listening on ADDRESS:PORT" (port 0 picks a free port and logs the real one),
    and serves until SIGINT/SIGTERM.

OPTIONS
    --data DIR                 Region directory (from `create`).
    --listen ADDRESS:PORT      Address to listen on (default 127.0.0.1:3810).
    --io-threads N             Threads doing blocking file IO (default 2).
    --max-jobs N               Jobs per connection admitted but not yet answered (default 1024).
    --max-bytes SIZE           Payload bytes per connection held in memory (default 64MiB).
                               When either limit is reached the downstairs stops reading that
                               connection until replies have been sent: memory stays flat.
    --max-frame SIZE           Largest frame body (default 33MiB: a 32 MiB write plus hashes).
    --max-connections N        Connections besides the writer, and separately connections that
                               have not said Hello yet (default 16 each). The writer (a
                               read-write Hello that passes fencing) is always admitted; a new
                               connection evicts the oldest one still silent.
    --hello-timeout SECONDS    Drop a peer that has not negotiated by then (default 10).
    --tls-dir DIR              Require mutual TLS: DIR holds ca-cert.pem, server-cert.pem and
                               server-key.pem (make them with nbd-certs). A client must present a
                               certificate issued by ca-cert.pem before anything else is read.
                               Default: plaintext, refused on a non-loopback --listen.
    --tls-allow-client NAMES   Comma list of client certificate names (common name or DNS name)
                               allowed to connect (default: upstairs, the name the README gives
                               the upstairs' certificate; * allows any certificate from the CA,
                               which also lets NBD clients of that CA in).
    --tls-handshake-timeout SECONDS
                               Drop a peer that has not completed the TLS handshake by then
                               (default 10).
    --insecure                 Allow plaintext on a non-loopback --listen (anyone who can reach
                               the port can then read and overwrite the region).
    --idle-timeout SECONDS     Close a negotiated connection that sends nothing for this long
                               (default 30; the engine pings an idle link every 5 s).
    --frame-timeout SECONDS    Once a frame has begun to arrive, all of it must arrive within
                               this time (default 30).
    --send-timeout SECONDS     A reply batch the peer has not read within this time closes the
                               connection, returning its memory (default 30).
    --max-memory SIZE          Frame bodies being received plus payloads in flight, over all
                               connections (default 512MiB; at least twice the sum of
                               max-bytes and max-frame, which is the share reserved for the
                               writer). A connection that would exceed it waits, unread.
    --max-generation-step N    How far one read-write Hello may raise the region's highest
                               generation (default 1000000). Stops a peer from recording
                               2^64-1, after which no upstairs could ever start again.
    --max-flush-step N         How far a flush or repair commit may put a flush number above
                               the highest this region has recorded (default 2^40). Stops a
                               peer from recording 2^63-1, after which every flush is refused.
    --log-interval SECONDS     Repeated errors are summarised once per interval (default 5).
    --receive-buffer SIZE      Socket read size per connection (default 64K).
    --sticky-dirty             Keep an extent written since the last flush marked dirty across
                               that flush (cleared by the next flush that finds it idle). Saves
                               a metadata fdatasync before the first write after each flush;
                               costs more repair after a crash. Default off.
    --verbose                  Debug logging.
    --log-json FILE            Also write every log event as one JSON object per line to FILE.
    --metrics ADDRESS:PORT     Serve Prometheus metrics on http://ADDRESS:PORT/metrics (off by
                               default; use 127.0.0.1).
    --config FILE              Read settings from FILE (default /etc/nbd-server/nbd-downstairs.json
                               if it exists).

CONFIGURATION
    Every option of `run` can also come from the config file, a JSON object whose keys are the
    option names without dashes ({"data": "/var/lib/nbd-server/r0", "listen": "0.0.0.0:3810",
    "tls-dir": "/etc/nbd-server/tls"}), or from an environment variable NBD_DOWNSTAIRS_ + the name
    in capitals with underscores (NBD_DOWNSTAIRS_TLS_DIR=/etc/nbd-server/tls). The command line overrides the environment, which
    overrides the file; a bad or unknown setting stops the server with a message naming it.

SYSTEMD
    A Type=notify service (scripts/systemd/nbd-downstairs@.service): READY=1 once listening,
    STOPPING=1 on SIGTERM, WATCHDOG=1 every WATCHDOG_USEC/2; journald-style log lines under the
    journal. SIGTERM stops accepting, lets the IO threads finish the jobs already queued, and
    closes the region; writes not yet covered by a flush were never acknowledged as durable,
    and the upstairs repairs those extents when the replica returns.
""";

    public const string Info = """
NAME
    nbd-downstairs info - print a region's geometry and per-extent state

SYNOPSIS
    nbd-downstairs info --data DIR

DESCRIPTION
    Reads the region without changing it (works while it is being served) and prints its uuid,
    geometry, highest generation, and per extent: generation, flush number, dirty bit.
""";

    public const string Bench = """
NAME
    nbd-downstairs bench - load client for scripts/bench-downstairs.sh (not for production)

SYNOPSIS
    nbd-downstairs bench --target ADDRESS:PORT --pattern randwrite|seqwrite|randread
                         [--io-size SIZE] [--depth N] [--seconds S] [--flush-every N] [--span SIZE]
                         [--tls-dir DIR]

DESCRIPTION
    Drives one downstairs with a fixed queue depth and prints one line:
    "pattern=... io=... depth=... ops=... seconds=... iops=... mibps=...". With --tls-dir (ca-cert.pem,
    client-cert.pem, client-key.pem) it connects with mutual TLS, as nbd-server does.
""";
}

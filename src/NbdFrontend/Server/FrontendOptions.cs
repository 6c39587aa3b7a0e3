using System.Net;

namespace NbdServer.Frontend.Server;

/// <summary>Limits and endpoints of the NBD frontend. Every limit is a named setting with a default.</summary>
internal sealed record FrontendOptions
{
    public const int DefaultPort = 10809;

    public IPEndPoint Listen { get; init; } = new(IPAddress.Loopback, DefaultPort);

    /// <summary>Largest READ or WRITE accepted (the kernel sends up to 32 MiB).</summary>
    public int MaxPayloadBytes { get; init; } = 32 * 1024 * 1024;

    /// <summary>
    /// Bytes of request and reply payload one connection may hold. At the cap the server stops
    /// reading that socket until replies drain. Must be at least <see cref="MaxPayloadBytes"/>.
    /// </summary>
    public long MaxInFlightBytesPerConnection { get; init; } = 64L * 1024 * 1024;

    /// <summary>Bytes of payload all connections together may hold.</summary>
    public long MaxInFlightBytesTotal { get; init; } = 512L * 1024 * 1024;

    /// <summary>Requests one connection may have in flight (the kernel keeps up to 128).</summary>
    public int MaxInFlightRequestsPerConnection { get; init; } = 256;

    /// <summary>Option data larger than this is discarded and answered with ERR_TOO_BIG.</summary>
    public int MaxOptionBytes { get; init; } = 64 * 1024;

    /// <summary>Options one connection may send before it must choose an export (a hostile client can't loop forever).</summary>
    public int MaxOptionsPerHandshake { get; init; } = 1024;

    /// <summary>A client that has not finished the handshake after this long is disconnected.</summary>
    public TimeSpan HandshakeTimeout { get; init; } = TimeSpan.FromSeconds(30);

    public int MaxConnections { get; init; } = 256;

    /// <summary>Descriptors in one BLOCK_STATUS reply.</summary>
    public int MaxBlockStatusExtents { get; init; } = 1024;

    /// <summary>How long shutdown waits for clients to drain and disconnect before closing them.</summary>
    public TimeSpan ShutdownTimeout { get; init; } = TimeSpan.FromSeconds(10);

    /// <summary>Repeated request failures are summarised once per this interval (a storm is a few lines with counts).</summary>
    public TimeSpan LogThrottleInterval { get; init; } = TimeSpan.FromSeconds(5);

    public void Validate()
    {
        if (MaxPayloadBytes < 4096)
        {
            throw new ArgumentException($"{nameof(MaxPayloadBytes)} must be at least 4096 (got {MaxPayloadBytes}).");
        }
        if (MaxInFlightBytesPerConnection < MaxPayloadBytes)
        {
            throw new ArgumentException($"{nameof(MaxInFlightBytesPerConnection)} ({MaxInFlightBytesPerConnection}) must be at least {nameof(MaxPayloadBytes)} ({MaxPayloadBytes}).");
        }
        if (MaxInFlightBytesTotal < MaxInFlightBytesPerConnection)
        {
            throw new ArgumentException($"{nameof(MaxInFlightBytesTotal)} ({MaxInFlightBytesTotal}) must be at least {nameof(MaxInFlightBytesPerConnection)} ({MaxInFlightBytesPerConnection}).");
        }
        if (MaxInFlightRequestsPerConnection < 1 || MaxConnections < 1 || MaxOptionsPerHandshake < 1 || MaxBlockStatusExtents < 1)
        {
            throw new ArgumentException("Request, connection, option and extent limits must be at least 1.");
        }
        if (LogThrottleInterval <= TimeSpan.Zero)
        {
            throw new ArgumentException($"{nameof(LogThrottleInterval)} must be positive.");
        }
    }
}

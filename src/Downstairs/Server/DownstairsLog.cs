using System.Net;
using Microsoft.Extensions.Logging;

namespace NbdServer.Downstairs.Server;

/// <summary>
/// Downstairs log lines; event ids 2000–2099 are stable (operators grep them). Retired: 2004
/// (Hello refused), 2005 (invalid frame), 2008 (too many connections): anyone who can connect can
/// cause those, so they now go through the region's LogThrottle, counted per peer address.
/// </summary>
internal static partial class DownstairsLog
{
    [LoggerMessage(EventId = 2000, Level = LogLevel.Information, Message = "Listening on {Endpoint}")]
    public static partial void Listening(ILogger logger, EndPoint endpoint);

    [LoggerMessage(EventId = 2001, Level = LogLevel.Information, Message = "Region {Dir}: uuid {Uuid}, {Size} bytes ({Blocks} blocks of {BlockSize}), {Extents} extents, highest generation {Generation}")]
    public static partial void RegionOpened(ILogger logger, string dir, Guid uuid, long size, long blocks, int blockSize, int extents, ulong generation);

    [LoggerMessage(EventId = 2003, Level = LogLevel.Information, Message = "{Remote}: upstairs {Upstairs} session {Session} generation {Generation} connected ({Mode})")]
    public static partial void Negotiated(ILogger logger, EndPoint? remote, Guid upstairs, Guid session, ulong generation, string mode);



    [LoggerMessage(EventId = 2006, Level = LogLevel.Information, Message = "{Remote}: connection closed ({Reason})")]
    public static partial void Closed(ILogger logger, EndPoint? remote, string reason);

    [LoggerMessage(EventId = 2007, Level = LogLevel.Warning, Message = "{Remote}: fenced: generation {Old} superseded by generation {New}")]
    public static partial void Fenced(ILogger logger, EndPoint? remote, ulong old, ulong @new);


    [LoggerMessage(EventId = 2009, Level = LogLevel.Information, Message = "Stopped")]
    public static partial void Stopped(ILogger logger);

    // Event id 2010 (fault injection enabled) is retired: the test-only switch left the product (test/Shared/faultio.c).

    [LoggerMessage(EventId = 2011, Level = LogLevel.Information, Message = "TLS required: client certificates from {Directory}/ca-cert.pem; allowed: {Allowed}")]
    public static partial void TlsRequired(ILogger logger, string directory, string allowed);

    [LoggerMessage(EventId = 2012, Level = LogLevel.Debug, Message = "{Remote}: TLS client {Peer} authenticated ({Protocol}, {Cipher})")]
    public static partial void TlsAuthenticated(ILogger logger, EndPoint? remote, string peer, string protocol, string cipher);

    [LoggerMessage(EventId = 2013, Level = LogLevel.Warning, Message = "Region {Dir}: {Count} extents are uncertain (writes not yet flushed may be lost: {Why}); the engine copies them whole")]
    public static partial void UncertainExtents(ILogger logger, string dir, int count, string why);
}

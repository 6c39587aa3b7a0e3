using Microsoft.Extensions.Logging;

namespace NbdServer.Frontend.Server;

/// <summary>Source-generated log lines of the NBD frontend (stable event ids: 1xxx).</summary>
internal static partial class FrontendLog
{
    [LoggerMessage(EventId = 1000, Level = LogLevel.Information, Message = "Serving NBD on {EndPoint}: {Exports}")]
    public static partial void Listening(ILogger logger, string endPoint, string exports);

    [LoggerMessage(EventId = 1001, Level = LogLevel.Debug, Message = "Connection {Id} from {Remote} opened")]
    public static partial void ConnectionOpened(ILogger logger, long id, string remote);

    [LoggerMessage(EventId = 1002, Level = LogLevel.Information, Message = "Connection {Id} from {Remote} attached to export '{Export}' (structured replies: {Structured}, block status: {BlockStatus}, TLS: {Tls})")]
    public static partial void Attached(ILogger logger, long id, string remote, string export, bool structured, bool blockStatus, bool tls);

    [LoggerMessage(EventId = 1003, Level = LogLevel.Information, Message = "Connection {Id} closed: {Reason}")]
    public static partial void ConnectionClosed(ILogger logger, long id, string reason);

    [LoggerMessage(EventId = 1004, Level = LogLevel.Warning, Message = "Connection {Id} from {Remote} dropped: {Reason}")]
    public static partial void ProtocolViolation(ILogger logger, long id, string remote, string reason);


    [LoggerMessage(EventId = 1006, Level = LogLevel.Information, Message = "Shutting down: draining {Connections} connection(s)")]
    public static partial void ShuttingDown(ILogger logger, int connections);

    [LoggerMessage(EventId = 1007, Level = LogLevel.Warning, Message = "Connection {Id}: {Command} at offset {Offset} length {Length} failed: {Error} ({Message})")]
    public static partial void CommandFailed(ILogger logger, long id, string command, ulong offset, uint length, string error, string message);

    [LoggerMessage(EventId = 1008, Level = LogLevel.Error, Message = "Connection {Id}: unexpected failure")]
    public static partial void Unexpected(ILogger logger, long id, Exception exception);

    [LoggerMessage(EventId = 1009, Level = LogLevel.Debug, Message = "Connection {Id}: option {Option} -> {Reply}")]
    public static partial void OptionHandled(ILogger logger, long id, string option, string reply);

    [LoggerMessage(EventId = 1010, Level = LogLevel.Warning, Message = "Connection {Id} from {Remote} closed: {Reason}; its budget was returned")]
    public static partial void ClientTooSlow(ILogger logger, long id, string remote, string reason);

    [LoggerMessage(EventId = 1011, Level = LogLevel.Information, Message = "Serving NBD on Unix socket {Path} (mode {Mode})")]
    public static partial void ListeningUnix(ILogger logger, string path, string mode);

    [LoggerMessage(EventId = 1012, Level = LogLevel.Warning, Message = "Removed a stale NBD Unix socket at {Path} (no server answered on it)")]
    public static partial void StaleSocketRemoved(ILogger logger, string path);

    [LoggerMessage(EventId = 1013, Level = LogLevel.Debug, Message = "Connection {Id}: TLS established ({Protocol}, client {Client})")]
    public static partial void TlsEstablished(ILogger logger, long id, string protocol, string client);

    [LoggerMessage(EventId = 1014, Level = LogLevel.Debug, Message = "Connection {Id} closed before attaching to an export: {Reason}")]
    public static partial void UnattachedConnectionClosed(ILogger logger, long id, string reason);

    [LoggerMessage(EventId = 1015, Level = LogLevel.Information, Message = "Connection {Id} from {Remote} resumed on export '{Export}' (handed over by the previous image)")]
    public static partial void Resumed(ILogger logger, long id, string remote, string export);

    [LoggerMessage(EventId = 1016, Level = LogLevel.Information, Message = "Reload (SIGHUP): handing {Connections} connection(s) over to a new image of {Path}")]
    public static partial void HandingOver(ILogger logger, int connections, string path);

    [LoggerMessage(EventId = 1017, Level = LogLevel.Information, Message = "Handover: {Sessions} session(s) and {Listeners} listener(s) go to the new image; {Closed} connection(s) closed (negotiating, TLS or not idle)")]
    public static partial void HandedOver(ILogger logger, int sessions, int listeners, int closed);

    [LoggerMessage(EventId = 1018, Level = LogLevel.Warning, Message = "Reload refused: {Reason}")]
    public static partial void ReloadRefused(ILogger logger, string reason);

    [LoggerMessage(EventId = 1019, Level = LogLevel.Information, Message = "Took over from the previous image: {Sessions} session(s), {Listeners} listener(s)")]
    public static partial void TookOver(ILogger logger, int sessions, int listeners);

    [LoggerMessage(EventId = 1020, Level = LogLevel.Error, Message = "The previous image's handover cannot be read ({Reason}); its clients are not served and must reconnect")]
    public static partial void HandoverUnreadable(ILogger logger, string reason);

    [LoggerMessage(EventId = 1021, Level = LogLevel.Warning, Message = "Handed-over {What} not used: {Reason}")]
    public static partial void HandedNotUsed(ILogger logger, string what, string reason);

    [LoggerMessage(EventId = 1100, Level = LogLevel.Information, Message = "Control socket on {Path} (nbd-server status)")]
    public static partial void ControlListening(ILogger logger, string path);

    [LoggerMessage(EventId = 1101, Level = LogLevel.Warning, Message = "Final flush failed: {Message}")]
    public static partial void FinalFlushFailed(ILogger logger, string message);
}

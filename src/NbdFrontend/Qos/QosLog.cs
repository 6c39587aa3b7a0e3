using Microsoft.Extensions.Logging;

namespace NbdServer.Frontend.Qos;

/// <summary>Source-generated log lines of QoS (stable event ids: 1200-1219).</summary>
internal static partial class QosLog
{
    [LoggerMessage(EventId = 1200, Level = LogLevel.Information, Message = "QoS of export '{Export}' set: {Limits}")]
    public static partial void Set(ILogger logger, string export, string limits);

    [LoggerMessage(EventId = 1201, Level = LogLevel.Information, Message = "QoS of export '{Export}' from the configuration: {Limits}")]
    public static partial void Configured(ILogger logger, string export, string limits);
}

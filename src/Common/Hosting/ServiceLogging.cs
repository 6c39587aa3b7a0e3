using Serilog;
using Serilog.Core;
using Serilog.Events;
using Serilog.Formatting.Json;

namespace NbdServer.Common.Hosting;

/// <summary>
/// The Serilog pipeline both daemons share: a human console format on a terminal, a journald
/// format under systemd, and optionally every event as one JSON object per line in a file.
/// </summary>
public static class ServiceLogging
{
    public const string ConsoleTemplate = "{Timestamp:HH:mm:ss.fff} {Level:u3} {Message:lj}{NewLine}{Exception}";

    /// <summary>
    /// journald stamps every line itself and reads a leading <c>&lt;N&gt;</c> as the syslog priority
    /// (sd-daemon(3)), so under systemd a line is just the priority and the message.
    /// </summary>
    public const string JournalTemplate = "<{SyslogLevel}>{Message:lj}{NewLine}{Exception}";

    /// <summary>True when stderr goes to the journal: systemd sets JOURNAL_STREAM for a unit whose output is the journal.</summary>
    public static bool UnderJournal(IReadOnlyDictionary<string, string?>? environment = null) =>
        (environment is null ? Environment.GetEnvironmentVariable("JOURNAL_STREAM") : environment.GetValueOrDefault("JOURNAL_STREAM")) is { Length: > 0 };

    public static Logger Create(bool verbose, string? jsonFile, bool? journal = null)
    {
        LoggerConfiguration config = new LoggerConfiguration()
            .MinimumLevel.Is(verbose ? LogEventLevel.Debug : LogEventLevel.Information)
            .MinimumLevel.Override("Microsoft", LogEventLevel.Warning);
        if (journal ?? UnderJournal())
        {
            config = config.Enrich.With<SyslogLevelEnricher>()
                .WriteTo.Console(outputTemplate: JournalTemplate, standardErrorFromLevel: LogEventLevel.Verbose);
        }
        else
        {
            config = config.WriteTo.Console(outputTemplate: ConsoleTemplate, standardErrorFromLevel: LogEventLevel.Verbose);
        }
        if (jsonFile is not null)
        {
            // One JSON object per line (timestamp, level, template, rendered message, properties):
            // for jq, Loki, Vector. Flushed every second so `tail -f` and tests see it promptly.
            config = config.WriteTo.File(new JsonFormatter(renderMessage: true), jsonFile, flushToDiskInterval: TimeSpan.FromSeconds(1));
        }
        return config.CreateLogger();
    }

    /// <summary>Serilog level → syslog priority (sd-daemon(3): 7 debug … 2 critical).</summary>
    public static int SyslogLevel(LogEventLevel level) => level switch
    {
        LogEventLevel.Verbose or LogEventLevel.Debug => 7,
        LogEventLevel.Information => 6,
        LogEventLevel.Warning => 4,
        LogEventLevel.Error => 3,
        _ => 2,
    };

    private sealed class SyslogLevelEnricher : ILogEventEnricher
    {
        private static readonly LogEventProperty[] Levels = [.. Enumerable.Range(0, 8).Select(n => new LogEventProperty("SyslogLevel", new ScalarValue(n)))];

        public void Enrich(LogEvent logEvent, ILogEventPropertyFactory propertyFactory) =>
            logEvent.AddPropertyIfAbsent(Levels[SyslogLevel(logEvent.Level)]);
    }
}

using System.Globalization;
using System.Net;
using NbdServer.Common.Cli;
using NbdServer.Common.Hosting;
using NbdServer.Common.Text;
using NbdServer.Common.Tls;
using NbdServer.Frontend.Server;
using NbdServer.ReplicaEngine;

namespace NbdServer.Frontend;

/// <summary>
/// The settings of <c>nbd-server</c> (serving): bound from the config file, the environment and the
/// command line (see <see cref="ServeSettings"/>) onto the options records, then validated.
/// </summary>
internal sealed record ServeCommand
{
    public const string DefaultExportName = "vol0";
    public const long DefaultMemorySize = 1L << 30;
    public const string DefaultConfigFile = "/etc/nbd-server/nbd-server.json";
    public const string EnvironmentPrefix = "NBD_SERVER_";

    public FrontendOptions Frontend { get; init; } = new();

    public string ExportName { get; init; } = DefaultExportName;

    public string Description { get; init; } = "";

    public string? FilePath { get; init; }

    public long? Size { get; init; }

    public bool ReadOnly { get; init; }

    public bool Verbose { get; init; }

    public string? LogJson { get; init; }

    public IPEndPoint? Metrics { get; init; }

    public EngineOptions? Engine { get; init; }

    /// <summary>The control socket's path; null: <see cref="Server.ControlServer.DefaultPath"/>.</summary>
    public string? Control { get; init; }

    /// <summary>Connection cap and deadline of the control socket and the metrics endpoint.</summary>
    public LocalHttpLimits Http { get; init; } = new();

    /// <summary>
    /// The command line alone (no config file, no environment) into settings, or an
    /// <see cref="ArgumentException"/> naming the bad one. The executable goes through
    /// <see cref="Load"/>; tests of single settings come here.
    /// </summary>
    public static ServeCommand Parse(IReadOnlyList<string> args)
    {
        System.CommandLine.ParseResult result = FrontendCommandLine.Program.Root.Parse(args);
        if (result.Errors.Count > 0)
        {
            throw new ArgumentException(result.Errors[0].Message);
        }
        return Load(result, new System.Collections.Hashtable(), defaultConfigFile: null).Command;
    }

    /// <summary>
    /// Config file &lt; <c>NBD_SERVER_*</c> environment &lt; command line, bound onto the records and
    /// validated; an error names the setting, where it was set and the rule.
    /// </summary>
    internal static (ServeCommand Command, LayeredSettings Settings) Load(System.CommandLine.ParseResult commandLine,
        System.Collections.IDictionary? environment = null, string? defaultConfigFile = DefaultConfigFile)
    {
        LayeredSettings settings = LayeredSettings.Load(commandLine, ServeSettings.All, EnvironmentPrefix,
            commandLine.Last(ServeSettings.Config), defaultConfigFile, environment);
        try
        {
            return (Bind(settings), settings);
        }
        catch (Exception e) when (e is ArgumentException or FormatException or OverflowException)
        {
            throw new ArgumentException(settings.Explain(e.Message), e);
        }
    }

    private static ServeCommand Bind(LayeredSettings settings)
    {
        var command = new ServeCommand();
        var frontend = new FrontendOptions();
        EngineOptions? engine = null;
        string? Value(System.CommandLine.Option<string[]> option) => settings.Get(option);
        void Engine(Func<EngineOptions, EngineOptions> set) => engine = set(engine ?? new EngineOptions());
        ulong ULong(string text, string setting) =>
            ulong.TryParse(text, NumberStyles.None, CultureInfo.InvariantCulture, out ulong value) ? value : throw new ArgumentException($"{setting}: '{text}' is not a whole number.");

        if (Value(ServeSettings.Listen) is { } listen)
        {
            frontend = frontend with { Listen = listen == "none" ? null : ParseEndPoint(listen, "--listen") };
        }
        if (Value(ServeSettings.Unix) is { } unix)
        {
            frontend = frontend with { UnixSocketPath = unix };
        }
        if (Value(ServeSettings.UnixMode) is { } unixMode)
        {
            frontend = frontend with { UnixSocketMode = unixMode };
        }
        if (Value(ServeSettings.Tls) is { } tls)
        {
            frontend = frontend with
            {
                Tls = tls switch
                {
                    "off" => TlsMode.Off,
                    "on" => TlsMode.On,
                    "require" => TlsMode.Require,
                    _ => throw new ArgumentException($"--tls: '{tls}' is not off, on or require."),
                },
            };
        }
        if (Value(ServeSettings.TlsDir) is { } tlsDir)
        {
            frontend = frontend with { TlsDir = tlsDir };
        }
        frontend = frontend with { TlsVerifyClient = settings.IsSet(ServeSettings.TlsVerifyClient) };
        if (Value(ServeSettings.PayloadTimeout) is { } payloadTimeout)
        {
            frontend = frontend with { PayloadTimeout = TimeSpan.FromSeconds(ParseSeconds(payloadTimeout, "--payload-timeout")) };
        }
        if (Value(ServeSettings.SendTimeout) is { } sendTimeout)
        {
            frontend = frontend with { SendTimeout = TimeSpan.FromSeconds(ParseSeconds(sendTimeout, "--send-timeout")) };
        }
        if (Value(ServeSettings.Export) is { } export)
        {
            command = command with { ExportName = export };
        }
        if (Value(ServeSettings.Description) is { } description)
        {
            command = command with { Description = description };
        }
        if (Value(ServeSettings.Memory) is { } memory)
        {
            if (settings.IsSet(ServeSettings.File))
            {
                throw new ArgumentException("--memory: --memory and --file are different backends; choose one.");
            }
            command = command with { Size = ByteSize.Parse(memory, "--memory") };
        }
        if (Value(ServeSettings.File) is { } file)
        {
            command = command with { FilePath = file };
        }
        if (Value(ServeSettings.Size) is { } size)
        {
            command = command with { Size = ByteSize.Parse(size, "--size") };
        }
        command = command with { ReadOnly = settings.IsSet(ServeSettings.ReadOnly), Verbose = settings.IsSet(ServeSettings.Verbose) };
        if (Value(ServeSettings.MaxPayload) is { } maxPayload)
        {
            frontend = frontend with { MaxPayloadBytes = checked((int)ByteSize.Parse(maxPayload, "--max-payload")) };
        }
        if (Value(ServeSettings.MaxInFlightBytesPerConnection) is { } perConnection)
        {
            frontend = frontend with { MaxInFlightBytesPerConnection = ByteSize.Parse(perConnection, "--max-inflight-bytes-per-connection") };
        }
        if (Value(ServeSettings.MaxInFlightBytes) is { } total)
        {
            frontend = frontend with { MaxInFlightBytesTotal = ByteSize.Parse(total, "--max-inflight-bytes") };
        }
        if (Value(ServeSettings.MaxRequestsPerConnection) is { } requests)
        {
            frontend = frontend with { MaxInFlightRequestsPerConnection = ParseInt(requests, "--max-requests-per-connection") };
        }
        if (Value(ServeSettings.MaxConnections) is { } connections)
        {
            frontend = frontend with { MaxConnections = ParseInt(connections, "--max-connections") };
        }
        if (Value(ServeSettings.Downstairs) is { } downstairs)
        {
            Engine(e => e with { Downstairs = [.. downstairs.Split(',').Select(d => ParseEndPoint(d.Trim(), "--downstairs"))] });
        }
        if (Value(ServeSettings.Generation) is { } generation)
        {
            Engine(e => e with { Generation = ULong(generation, "--generation") });
        }
        if (Value(ServeSettings.MaxGenerationStep) is { } generationStep)
        {
            Engine(e => e with { MaxGenerationStep = ULong(generationStep, "--max-generation-step") });
        }
        if (Value(ServeSettings.MaxFlushStep) is { } flushStep)
        {
            Engine(e => e with { MaxFlushStep = ULong(flushStep, "--max-flush-step") });
        }
        if (Value(ServeSettings.Control) is { } control)
        {
            command = command with { Control = ParseControlPath(control, "--control") };
        }
        if (Value(ServeSettings.HttpMaxConnections) is { } httpConnections)
        {
            command = command with { Http = command.Http with { MaxConnections = ParseInt(httpConnections, "--http-max-connections") } };
        }
        if (Value(ServeSettings.HttpTimeout) is { } httpTimeout)
        {
            command = command with { Http = command.Http with { Timeout = TimeSpan.FromSeconds(ParseSeconds(httpTimeout, "--http-timeout")) } };
        }
        if (Value(ServeSettings.MaxOutstandingJobs) is { } jobs)
        {
            Engine(e => e with { MaxOutstandingJobs = ParseInt(jobs, "--max-outstanding-jobs") });
        }
        if (Value(ServeSettings.MaxOutstandingBytes) is { } bytes)
        {
            Engine(e => e with { MaxOutstandingBytes = ByteSize.Parse(bytes, "--max-outstanding-bytes") });
        }
        if (Value(ServeSettings.NoProgressTimeout) is { } noProgress)
        {
            Engine(e => e with { NoProgressTimeout = TimeSpan.FromSeconds(ParseSeconds(noProgress, "--no-progress-timeout")) });
        }
        if (Value(ServeSettings.DegradedWriteTimeout) is { } degraded)
        {
            Engine(e => e with { DegradedWriteTimeout = TimeSpan.FromSeconds(ParseSeconds(degraded, "--degraded-write-timeout")) });
        }
        if (Value(ServeSettings.ScrubInterval) is { } scrub)
        {
            Engine(e => e with { ScrubInterval = TimeSpan.FromSeconds(ParseSecondsOrZero(scrub, "--scrub-interval")) });
        }
        if (Value(ServeSettings.RepairRateLimit) is { } rate)
        {
            Engine(e => e with { RepairRateLimit = ParseNumber(rate, "--repair-rate-limit") });
        }
        if (Value(ServeSettings.RepairDutyCycle) is { } duty)
        {
            Engine(e => e with { RepairDutyCycle = ParseNumber(duty, "--repair-duty-cycle") });
        }
        if (Value(ServeSettings.RepairParallelism) is { } parallelism)
        {
            Engine(e => e with { RepairParallelism = ParseInt(parallelism, "--repair-parallelism") });
        }
        if (Value(ServeSettings.StopRepairGrace) is { } grace)
        {
            Engine(e => e with { StopRepairGrace = TimeSpan.FromSeconds(ParseSecondsOrZero(grace, "--stop-repair-grace")) });
        }
        if (Value(ServeSettings.ChangeRecordMaxBytes) is { } recordBytes)
        {
            Engine(e => e with { ChangeRecordMaxBytes = ByteSize.Parse(recordBytes, "--change-record-max-bytes") });
        }
        if (Value(ServeSettings.ChangeRecordGranule) is { } granule)
        {
            Engine(e => e with { ChangeRecordGranuleBytes = checked((int)ByteSize.Parse(granule, "--change-record-granule")) });
        }
        if (Value(ServeSettings.DownstairsTlsDir) is { } downstairsTlsDir)
        {
            Engine(e => e with { DownstairsTlsDir = downstairsTlsDir });
        }
        if (Value(ServeSettings.DownstairsTlsName) is { } names)
        {
            Engine(e => e with { DownstairsTlsNames = List(names) });
        }
        if (Value(ServeSettings.DownstairsTlsPin) is { } pins)
        {
            Engine(e => e with { DownstairsTlsPins = List(pins) });
        }
        bool insecure = settings.IsSet(ServeSettings.Insecure);
        if (Value(ServeSettings.QosReadIops) is { } qosReadIops)
        {
            frontend = frontend with { QosReadIops = ParseNumber(qosReadIops, "--qos-read-iops") };
        }
        if (Value(ServeSettings.QosWriteIops) is { } qosWriteIops)
        {
            frontend = frontend with { QosWriteIops = ParseNumber(qosWriteIops, "--qos-write-iops") };
        }
        if (Value(ServeSettings.QosTotalIops) is { } qosTotalIops)
        {
            frontend = frontend with { QosTotalIops = ParseNumber(qosTotalIops, "--qos-total-iops") };
        }
        if (Value(ServeSettings.QosReadMbps) is { } qosReadMbps)
        {
            frontend = frontend with { QosReadMbps = ParseNumber(qosReadMbps, "--qos-read-mbps") };
        }
        if (Value(ServeSettings.QosWriteMbps) is { } qosWriteMbps)
        {
            frontend = frontend with { QosWriteMbps = ParseNumber(qosWriteMbps, "--qos-write-mbps") };
        }
        if (Value(ServeSettings.QosTotalMbps) is { } qosTotalMbps)
        {
            frontend = frontend with { QosTotalMbps = ParseNumber(qosTotalMbps, "--qos-total-mbps") };
        }
        if (Value(ServeSettings.QosBurst) is { } qosBurst)
        {
            frontend = frontend with { QosBurst = TimeSpan.FromSeconds(ParseSeconds(qosBurst, "--qos-burst")) };
        }
        if (Value(ServeSettings.LogInterval) is { } logInterval)
        {
            frontend = frontend with { LogThrottleInterval = TimeSpan.FromSeconds(ParseSeconds(logInterval, "--log-interval")) };
        }
        if (Value(ServeSettings.LogJson) is { } logJson)
        {
            command = command with { LogJson = logJson };
        }
        if (Value(ServeSettings.Metrics) is { } metrics)
        {
            command = command with { Metrics = ParseEndPoint(metrics, "--metrics") };
        }
        command = command with { Engine = engine };
        if (command.ExportName.Length == 0)
        {
            throw new ArgumentException("--export: the name must not be empty (the first export is served under the empty name anyway).");
        }
        if (command.Engine is not null)
        {
            command = command with { Engine = command.Engine with { LogThrottleInterval = frontend.LogThrottleInterval, Insecure = insecure } };
        }
        frontend = frontend with { Insecure = insecure };
        if (command.Engine is { Downstairs.Count: not 3 and var count })
        {
            // EngineOptions says so too, but without the option's name (and so without its source).
            throw new ArgumentException($"--downstairs: exactly three downstairs are needed (got {count}).");
        }
        try
        {
            frontend.Validate();
            command.Engine?.Validate();
        }
        catch (ArgumentException e)
        {
            // The records speak of properties; the operator set options. Longest first: Downstairs is a
            // prefix of DownstairsTlsDir.
            throw new ArgumentException(OptionNames.OrderByDescending(p => p.Key.Length).Aggregate(e.Message, (m, p) => m.Replace(p.Key, p.Value, StringComparison.Ordinal)), e);
        }
        if (command.Engine is not null && command.FilePath is not null)
        {
            throw new ArgumentException("--downstairs and --file are different backends; choose one.");
        }
        if (command.Engine?.DownstairsTlsDir is { } engineTlsDir)
        {
            // Loaded once here so a missing or mismatched file stops the start with one line naming it.
            try
            {
                using TlsCredentials check = TlsCredentials.LoadClient(engineTlsDir, requireCertificate: true);
            }
            catch (TlsSetupException e)
            {
                throw new ArgumentException($"--downstairs-tls-dir: {e.Message}", e);
            }
        }
        if (frontend.Tls != TlsMode.Off && frontend.TlsDir is { } frontendTlsDir)
        {
            try
            {
                using TlsCredentials check = TlsCredentials.LoadServer(frontendTlsDir, requireCa: frontend.TlsVerifyClient);
            }
            catch (TlsSetupException e)
            {
                throw new ArgumentException($"--tls-dir: {e.Message}", e);
            }
        }
        return command with { Frontend = frontend };
    }

    /// <summary>Validated record properties and the options (config keys) that set them.</summary>
    internal static readonly IReadOnlyDictionary<string, string> OptionNames = new Dictionary<string, string>(StringComparer.Ordinal)
    {
        ["MaxInFlightBytesPerConnection"] = "--max-inflight-bytes-per-connection",
        ["MaxInFlightBytesTotal"] = "--max-inflight-bytes",
        ["MaxInFlightRequestsPerConnection"] = "--max-requests-per-connection",
        ["MaxPayloadBytes"] = "--max-payload",
        ["MaxConnections"] = "--max-connections",
        ["MaxOutstandingJobs"] = "--max-outstanding-jobs",
        ["MaxOutstandingBytes"] = "--max-outstanding-bytes",
        ["NoProgressTimeout"] = "--no-progress-timeout",
        ["DegradedWriteTimeout"] = "--degraded-write-timeout",
        ["ScrubInterval"] = "--scrub-interval",
        ["RepairRateLimit"] = "--repair-rate-limit",
        ["RepairDutyCycle"] = "--repair-duty-cycle",
        ["RepairParallelism"] = "--repair-parallelism",
        ["StopRepairGrace"] = "--stop-repair-grace",
        ["ChangeRecordMaxBytes"] = "--change-record-max-bytes",
        ["ChangeRecordGranuleBytes"] = "--change-record-granule",
        ["LogThrottleInterval"] = "--log-interval",
        ["Generation"] = "--generation",
        ["MaxGenerationStep"] = "--max-generation-step",
        ["MaxFlushStep"] = "--max-flush-step",
        ["Downstairs"] = "--downstairs",
        ["Listen"] = "--listen",
        ["UnixSocketPath"] = "--unix",
        ["UnixSocketMode"] = "--unix-mode",
        ["TlsVerifyClient"] = "--tls-verify-client",
        ["TlsDir"] = "--tls-dir",
        ["Tls"] = "--tls",
        ["PayloadTimeout"] = "--payload-timeout",
        ["SendTimeout"] = "--send-timeout",
        ["DownstairsTlsDir"] = "--downstairs-tls-dir",
        ["DownstairsTlsNames"] = "--downstairs-tls-name",
        ["DownstairsTlsPins"] = "--downstairs-tls-pin",
        ["Insecure"] = "--insecure",
        ["QosReadIops"] = "--qos-read-iops",
        ["QosWriteIops"] = "--qos-write-iops",
        ["QosTotalIops"] = "--qos-total-iops",
        ["QosReadMbps"] = "--qos-read-mbps",
        ["QosWriteMbps"] = "--qos-write-mbps",
        ["QosTotalMbps"] = "--qos-total-mbps",
        ["QosBurst"] = "--qos-burst",
    };

    private static string[] List(string text) => text.Split(',', StringSplitOptions.TrimEntries | StringSplitOptions.RemoveEmptyEntries);
    /// <summary>A socket path; an ADDR:PORT (the control endpoint's old TCP form) is refused with the reason.</summary>
    internal static string ParseControlPath(string text, string setting)
    {
        if (Server.ControlServer.RefuseTcp(text, setting) is { } refusal)
        {
            throw new ArgumentException(refusal);
        }
        if (text.Length == 0)
        {
            throw new ArgumentException($"{setting}: the path must not be empty.");
        }
        return text;
    }

    private static int ParseInt(string text, string setting) =>
        int.TryParse(text, NumberStyles.None, CultureInfo.InvariantCulture, out int value) && value > 0
            ? value
            : throw new ArgumentException($"{setting}: '{text}' is not a positive integer.");

    private static double ParseSeconds(string text, string setting) =>
        double.TryParse(text, NumberStyles.AllowDecimalPoint, CultureInfo.InvariantCulture, out double value) && value > 0
            ? value
            : throw new ArgumentException($"{setting}: '{text}' is not a positive number of seconds.");

    private static double ParseNumber(string text, string setting) =>
        double.TryParse(text, NumberStyles.AllowDecimalPoint, CultureInfo.InvariantCulture, out double value) && value >= 0
            ? value
            : throw new ArgumentException($"{setting}: '{text}' is not a number (0 or more).");

    private static double ParseSecondsOrZero(string text, string setting) =>
        double.TryParse(text, NumberStyles.AllowDecimalPoint, CultureInfo.InvariantCulture, out double value) && value >= 0
            ? value
            : throw new ArgumentException($"{setting}: '{text}' is not a number of seconds (0 or more).");

    internal static IPEndPoint ParseEndPoint(string text, string setting)
    {
        if (IPEndPoint.TryParse(text, out IPEndPoint? endPoint))
        {
            if (endPoint.Port == 0 && !text.EndsWith(":0", StringComparison.Ordinal))
            {
                endPoint.Port = FrontendOptions.DefaultPort;
            }
            return endPoint;
        }
        throw new ArgumentException($"{setting}: '{text}' is not ADDRESS:PORT (example: 127.0.0.1:10809).");
    }
}

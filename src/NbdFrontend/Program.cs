using Microsoft.Extensions.DependencyInjection;
using Microsoft.Extensions.Hosting;
using Microsoft.Extensions.Logging;
using Microsoft.Extensions.Options;
using NbdServer.Common.Cli;
using NbdServer.Common.Hosting;
using NbdServer.Common.Volumes;
using NbdServer.Frontend;
using NbdServer.Frontend.Qos;
using NbdServer.Frontend.Server;
using NbdServer.Frontend.Volumes;
using NbdServer.ReplicaEngine;
using Serilog;

// Inline socket completions (see NbdFrontend.csproj for the measurement): the runtime takes them only
// from the environment, read once at the first socket operation, so the runtimeconfig switch is
// turned into the variable here, before any socket exists. An operator's own setting wins.
const string InlineCompletionsVariable = "DOTNET_SYSTEM_NET_SOCKETS_INLINE_COMPLETIONS";
if (AppContext.TryGetSwitch("NbdServer.Sockets.InlineCompletions", out bool inlineCompletions)
    && inlineCompletions && Environment.GetEnvironmentVariable(InlineCompletionsVariable) is null)
{
    Environment.SetEnvironmentVariable(InlineCompletionsVariable, "1");
}

// The server: before anything slow or any await, on the main thread: a SIGHUP's default action would
// end the process (see ReloadSignal). The subcommands (status, scrub, repair, qos…) keep it, so a
// terminal's hangup still ends them.
if (FrontendCommandLine.Serves(args))
{
    ReloadSignal.Install();
}

return await FrontendCommandLine.Program.RunAsync(args);

/// <summary>The root command's action: load and validate the settings, then serve until SIGTERM.</summary>
internal static class ServeHost
{
    /// <summary>Time a stop may take beyond the drain and the repair grace: the final flush and closing.</summary>
    private static readonly TimeSpan StopMargin = TimeSpan.FromSeconds(15);

    public static async Task<int> RunAsync(System.CommandLine.ParseResult commandLine)
    {
        // Config file < NBD_SERVER_* environment < command line; a bad setting is one line and exit 2.
        (ServeCommand command, LayeredSettings settings) = ServeCommand.Load(commandLine);
        if (Environment.GetEnvironmentVariable(Handover.CheckVariable) == "1")
        {
            // A reload's trial start (Handover.TestStartAsync): this image and its settings load.
            Console.Out.WriteLine("nbd-server: reload check passed: the settings load with this image");
            return 0;
        }
        Log.Logger = ServiceLogging.Create(command.Verbose, command.LogJson);
        if (settings.ConfigFile is not null)
        {
            Log.Information("Settings from {ConfigFile}", settings.ConfigFile);
        }
        try
        {
            HostApplicationBuilder builder = Host.CreateApplicationBuilder();
            builder.Services.AddSerilog();
            builder.Services.AddSingleton(command);
            // The options pattern for what is bound: IOptions<FrontendOptions>, IOptions<EngineOptions>.
            builder.Services.AddSingleton(Options.Create(command.Frontend));
            if (command.Engine is { } engine)
            {
                builder.Services.AddSingleton(Options.Create(engine));
            }
            // A reload execs this command line again: its settings (the config file and environment
            // as they are now) are checked first, so a bad edit is refused while the clients are still served.
            builder.Services.AddSingleton(new ReloadPreflight(() =>
            {
                try
                {
                    ServeCommand.Load(commandLine);
                    return null;
                }
                catch (Exception e) when (e is ArgumentException or FormatException or OverflowException or IOException)
                {
                    return $"the settings the new image would start with are refused: {e.Message}";
                }
            }));
            // The host's own bound on StopAsync (30 s by default) must not cut short what a stop is
            // given: the drain (ShutdownTimeout), then a running repair's grace, with room for the flush.
            builder.Services.Configure<HostOptions>(o => o.ShutdownTimeout =
                command.Frontend.ShutdownTimeout + (command.Engine?.StopRepairGrace ?? TimeSpan.Zero) + StopMargin);
            builder.Services.AddOperations(command.Metrics, command.Http);
            builder.Services.AddHostedService<NbdService>();
            using IHost host = builder.Build();
            await host.RunAsync();
            return 0;
        }
        catch (Exception e) when (e is IOException or UnauthorizedAccessException or InvalidOperationException or ArgumentException or System.Net.Sockets.SocketException)
        {
            Log.Fatal("nbd-server: {Message}", e.Message);
            return 1;
        }
        finally
        {
            await Log.CloseAndFlushAsync();
        }
    }
}

/// <summary>
/// Opens the volume (a replicated one starts only after fencing and reconciliation), then serves it
/// over NBD for the lifetime of the host. Ctrl-C / SIGTERM drain in-flight requests, flush, and exit.
/// </summary>
internal sealed class NbdService(ServeCommand command, ReloadPreflight preflight, ILogger<NbdService> logger, IHostApplicationLifetime lifetime) : IHostedService, IAsyncDisposable
{
    // One lifecycle: a reload and a stop exclude each other (see ReloadAsync and StopAsync).
    private const int Serving = 0;
    private const int Reloading = 1;
    private const int Stopping = 2;
    private int _phase;
    private Task _reload = Task.CompletedTask;
    private IBlockVolume? _volume;
    private NbdListener? _listener;
    private ControlServer? _control;
    private NbdServer.Common.Logging.LogThrottle? _controlThrottle;
    private EngineMetrics? _metrics;

    public async Task StartAsync(CancellationToken cancellationToken)
    {
        // Taken first: the variable must not reach anything this process starts.
        HandoverState? handed = Handover.Take(logger);
        // The export's QoS exists before the volume, so the control socket can show and change it from the start.
        var qos = new QosLimiter(command.Frontend.ToQosLimits());
        var qosControl = new QosControl([(command.ExportName, qos)], logger);
        if (qos.Active)
        {
            QosLog.Configured(logger, command.ExportName, qos.Limits.ToString());
        }
        if (command.Engine is { } engine)
        {
            // The control endpoint comes up first, so `nbd-server status` shows a long reconciliation's progress.
            var replicated = await ReplicatedVolume.StartAsync(engine, logger, created: v =>
            {
                string path = command.Control ?? ControlServer.DefaultPath(create: true)
                    ?? throw new InvalidOperationException($"no directory for the control socket ({ControlServer.SystemRuntimeDirectory} and $XDG_RUNTIME_DIR unusable); give --control PATH");
                _controlThrottle = new NbdServer.Common.Logging.LogThrottle(logger, command.Frontend.LogThrottleInterval);
                _control = new ControlServer(path, v.GetStatus, () => v.StartScrub(), v.SetRepairPace, command.Http, _controlThrottle, qosControl);
                _control.Start();
                FrontendLog.ControlListening(logger, path);
            }, lifetime.ApplicationStopping);
            _volume = replicated;
            _metrics = new EngineMetrics(replicated);
        }
        else
        {
            _volume = command.FilePath is { } path
                ? FileVolume.Open(path, command.Size, command.ReadOnly)
                : new MemoryVolume(command.Size ?? ServeCommand.DefaultMemorySize, command.ReadOnly);
            if (command.Control is { } controlPath)
            {
                // Only when asked for: many file servers on one host must not fight over the default path.
                _controlThrottle = new NbdServer.Common.Logging.LogThrottle(logger, command.Frontend.LogThrottleInterval);
                _control = new ControlServer(controlPath, status: null, limits: command.Http, throttle: _controlThrottle, qos: qosControl);
                _control.Start();
                FrontendLog.ControlListening(logger, controlPath);
            }
        }
        var exports = new ExportRegistry([new NbdExport(command.ExportName, _volume, command.Description, command.ReadOnly) { Qos = qos }]);
        _listener = new NbdListener(exports, command.Frontend, logger);
        _listener.Start(handed);
        ReloadSignal.OnReload(() => _reload = Task.Run(ReloadAsync));
    }

    /// <summary>
    /// SIGHUP (systemctl reload): a new image of this executable takes over every client between two
    /// requests (see <see cref="Handover"/>). The volume is flushed and closed first, so the new
    /// image's activation finds the replicas in agreement and reconciles nothing.
    /// </summary>
    private async Task ReloadAsync()
    {
        int was = Interlocked.CompareExchange(ref _phase, Reloading, Serving);
        if (was != Serving)
        {
            FrontendLog.ReloadRefused(logger, was == Reloading ? "a reload is already running" : "the server is stopping");
            return;
        }
        NbdListener? listener = _listener;
        string? refusal = listener is null ? "the server is not serving" : Handover.CannotReload() ?? preflight.Check()
            ?? await Handover.TestStartAsync(command.Frontend.ReloadCheckTimeout);
        if (refusal is not null || listener is null)
        {
            FrontendLog.ReloadRefused(logger, refusal ?? "");
            Interlocked.CompareExchange(ref _phase, Serving, Reloading);
            return;
        }
        try
        {
            using (SdNotify? notify = SdNotify.FromEnvironment())
            {
                notify?.Send("RELOADING=1");
            }
            FrontendLog.HandingOver(logger, listener.ConnectionCount, Environment.ProcessPath!);
            (HandoverState state, IReadOnlyList<System.Net.Sockets.Socket> sockets, int closed) = await listener.HandOverAsync();
            FrontendLog.HandedOver(logger, state.Sessions.Count, state.Listeners.Count, closed);
            await FlushVolumeAsync(close: true, CancellationToken.None);
            if (Volatile.Read(ref _phase) == Stopping)
            {
                // SIGTERM came during the handover: stop here, flushed, instead of starting a new image.
                foreach (System.Net.Sockets.Socket socket in sockets)
                {
                    socket.Dispose();
                }
                FrontendLog.ReloadRefused(logger, "the server was told to stop during the reload; the stopped connections are closed");
                return;
            }
            await Log.CloseAndFlushAsync();
            Die(Handover.Exec(state, sockets));
        }
        catch (Exception e)
        {
            Die(e.Message);
        }
    }

    /// <summary>
    /// A reload that failed after the clients were stopped: nothing serves them any more, so the
    /// process ends and the supervisor starts it again (their sockets close with it).
    /// </summary>
    private static void Die(string reason)
    {
        Console.Error.WriteLine($"nbd-server: reload failed after the clients were stopped: {reason}");
        Environment.Exit(1);
    }

    /// <summary>
    /// Flushes the volume (whatever the clients left unflushed is made durable before we go); a
    /// reload also closes it and the control socket here, a stop leaves that to DisposeAsync.
    /// </summary>
    private async Task FlushVolumeAsync(bool close, CancellationToken cancellationToken)
    {
        if (close && Interlocked.Exchange(ref _control, null) is { } control)
        {
            await control.DisposeAsync();
        }
        if (_volume is not { } volume)
        {
            return;
        }
        if ((volume.Features & VolumeFeatures.ReadOnly) == 0)
        {
            try
            {
                await volume.FlushAsync(cancellationToken);
            }
            catch (VolumeException e)
            {
                FrontendLog.FinalFlushFailed(logger, e.Message);
            }
        }
        if (close && Interlocked.Exchange(ref _volume, null) is { } closing)
        {
            await closing.DisposeAsync();
        }
    }

    public async Task StopAsync(CancellationToken cancellationToken)
    {
        ReloadSignal.Close();
        if (Interlocked.Exchange(ref _phase, Stopping) == Reloading)
        {
            // The reload sees the stop before it execs, and ends flushed instead; bounded, in case
            // it ends the process itself.
            await _reload.WaitAsync(command.Frontend.ShutdownTimeout + command.Frontend.HandoverTimeout).ContinueWith(static _ => { }, TaskScheduler.Default);
            return;
        }
        if (_listener is not null)
        {
            await _listener.StopAsync();
        }
        await FlushVolumeAsync(close: false, cancellationToken);
        if (_volume is NbdServer.ReplicaEngine.ReplicatedVolume replicated)
        {
            await replicated.FinishRepairsAsync(cancellationToken);
        }
    }

    public async ValueTask DisposeAsync()
    {
        ReloadSignal.Close();
        if (_listener is not null)
        {
            await _listener.DisposeAsync();
        }
        if (_control is not null)
        {
            await _control.DisposeAsync();
        }
        _controlThrottle?.Dispose();
        _metrics?.Dispose();
        if (_volume is not null)
        {
            await _volume.DisposeAsync();
        }
    }
}

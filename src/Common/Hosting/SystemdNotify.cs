using System.Globalization;
using System.Net.Sockets;
using System.Text;
using Microsoft.Extensions.DependencyInjection;
using Microsoft.Extensions.Hosting;
using Microsoft.Extensions.Hosting.Systemd;
using Microsoft.Extensions.Logging;

namespace NbdServer.Common.Hosting;

/// <summary>
/// The sd_notify protocol (sd_notify(3)): one datagram per state change to the unix socket named
/// by <c>NOTIFY_SOCKET</c> ("@name" is in the abstract namespace).
/// </summary>
public sealed class SdNotify : IDisposable
{
    private readonly Socket _socket;
    private readonly UnixDomainSocketEndPoint _endPoint;

    private SdNotify(string path)
    {
        _endPoint = new UnixDomainSocketEndPoint(path.StartsWith('@') ? "\0" + path[1..] : path);
        _socket = new Socket(AddressFamily.Unix, SocketType.Dgram, ProtocolType.Unspecified);
    }

    /// <summary>A notifier for <c>NOTIFY_SOCKET</c>, or null when the process is not supervised.</summary>
    public static SdNotify? FromEnvironment() =>
        Environment.GetEnvironmentVariable("NOTIFY_SOCKET") is { Length: > 0 } path ? new SdNotify(path) : null;

    /// <summary>Sends "READY=1", "STOPPING=1", "WATCHDOG=1", "STATUS=…"; false if the manager is gone.</summary>
    public bool Send(string state)
    {
        try
        {
            _socket.SendTo(Encoding.UTF8.GetBytes(state), _endPoint);
            return true;
        }
        catch (SocketException)
        {
            return false;
        }
    }

    public void Dispose() => _socket.Dispose();
}

/// <summary>
/// systemd integration beyond <c>AddSystemd()</c>: pings the watchdog (WATCHDOG=1 every
/// WATCHDOG_USEC / 2) while the host runs, and sends READY / STOPPING itself when the host's
/// <see cref="SystemdLifetime"/> is not active (it only is when the parent process is systemd; a
/// supervisor such as <c>systemd-notify --fork</c> or a test still sets NOTIFY_SOCKET).
/// READY is sent on ApplicationStarted, i.e. after every hosted service's StartAsync returned:
/// for nbd-server that is after activation, reconciliation and listen.
/// </summary>
internal sealed partial class SystemdNotifyService(IHostApplicationLifetime lifetime, IServiceProvider services, ILogger<SystemdNotifyService> logger) : BackgroundService
{
    protected override async Task ExecuteAsync(CancellationToken stoppingToken)
    {
        using SdNotify? notify = SdNotify.FromEnvironment();
        if (notify is null)
        {
            return;
        }
        bool lifetimeNotifies = services.GetService<ISystemdNotifier>() is { IsEnabled: true } && services.GetService<IHostLifetime>() is SystemdLifetime;
        if (!lifetimeNotifies)
        {
            lifetime.ApplicationStarted.Register(() => notify.Send("READY=1"));
            lifetime.ApplicationStopping.Register(() => notify.Send("STOPPING=1"));
        }
        TimeSpan? interval = WatchdogInterval(Environment.GetEnvironmentVariable("WATCHDOG_USEC"), Environment.GetEnvironmentVariable("WATCHDOG_PID"), Environment.ProcessId);
        if (interval is null)
        {
            await Task.Delay(Timeout.Infinite, stoppingToken).ContinueWith(static _ => { }, TaskScheduler.Default);
            return;
        }
        WatchdogEnabled(logger, interval.Value.TotalSeconds);
        using var timer = new PeriodicTimer(interval.Value);
        notify.Send("WATCHDOG=1");
        try
        {
            // A wedged process (thread pool starved, deadlocked host) stops pinging and systemd restarts it.
            while (await timer.WaitForNextTickAsync(stoppingToken))
            {
                notify.Send("WATCHDOG=1");
            }
        }
        catch (OperationCanceledException)
        {
        }
    }

    /// <summary>Half the watchdog timeout, as sd_watchdog_enabled(3) recommends; null when disabled or meant for another process.</summary>
    internal static TimeSpan? WatchdogInterval(string? usec, string? pid, int processId)
    {
        if (!long.TryParse(usec, NumberStyles.None, CultureInfo.InvariantCulture, out long micros) || micros <= 0)
        {
            return null;
        }
        if (pid is { Length: > 0 } && pid != processId.ToString(CultureInfo.InvariantCulture))
        {
            return null;
        }
        return TimeSpan.FromMicroseconds(micros / 2.0);
    }

    [LoggerMessage(EventId = 9100, Level = LogLevel.Information, Message = "systemd watchdog enabled: pinging every {Seconds:0.###} s")]
    private static partial void WatchdogEnabled(ILogger logger, double seconds);
}

using System.Net;
using Microsoft.Extensions.DependencyInjection;
using Microsoft.Extensions.Hosting;
using Microsoft.Extensions.Logging;

namespace NbdServer.Common.Hosting;

/// <summary>What both daemons add to their host: systemd lifetime and notifications, the watchdog, metrics.</summary>
public static partial class OperationsServices
{
    /// <summary>Call before adding the daemon's own hosted service, so READY follows its start and metrics outlive its stop.</summary>
    public static IServiceCollection AddOperations(this IServiceCollection services, IPEndPoint? metrics, LocalHttpLimits? httpLimits = null)
    {
        // Under systemd: SystemdLifetime (READY=1 once started, STOPPING=1, SIGTERM → graceful stop).
        services.AddSystemd();
        services.AddHostedService<SystemdNotifyService>();
        if (metrics is not null)
        {
            services.AddHostedService(sp => new MetricsService(metrics, httpLimits, sp.GetRequiredService<ILogger<MetricsService>>()));
        }
        return services;
    }

    private sealed class MetricsService(IPEndPoint endPoint, LocalHttpLimits? limits, ILogger logger) : IHostedService, IAsyncDisposable
    {
        private Logging.LogThrottle? _throttle;
        private MetricsEndpoint? _endpoint;

        public async Task StartAsync(CancellationToken cancellationToken)
        {
            // Refused scrapes (foreign Host, over the cap) are summarised like every other storm; 5 s is both daemons' --log-interval default.
            _throttle = new Logging.LogThrottle(logger, TimeSpan.FromSeconds(5));
            _endpoint = new MetricsEndpoint(endPoint, limits, _throttle);
            await _endpoint.StartAsync();
            MetricsListening(logger, _endpoint.LocalEndPoint.ToString());
        }

        public Task StopAsync(CancellationToken cancellationToken) => Task.CompletedTask;

        public async ValueTask DisposeAsync()
        {
            if (_endpoint is not null)
            {
                await _endpoint.DisposeAsync();
            }
            _throttle?.Dispose();
        }
    }

    [LoggerMessage(EventId = 9101, Level = LogLevel.Information, Message = "Prometheus metrics on http://{EndPoint}/metrics")]
    private static partial void MetricsListening(ILogger logger, string endPoint);
}

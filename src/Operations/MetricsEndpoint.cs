using System.Diagnostics.Metrics;
using System.Net;
using Microsoft.AspNetCore.Builder;
using Microsoft.AspNetCore.Http;
using Microsoft.AspNetCore.Routing;
using Microsoft.Extensions.DependencyInjection;
using NbdServer.Common.Logging;
using OpenTelemetry.Metrics;
using OpenTelemetry.Resources;

namespace NbdServer.Common.Hosting;

/// <summary>
/// <c>--metrics ADDR:PORT</c>: answers <c>GET /metrics</c> in the Prometheus text format (OpenMetrics
/// to a scraper that asks for it) through OpenTelemetry's exporter for ASP.NET Core, and nothing
/// else (other paths 404, other methods 405, a Host that isn't local 400). Opt-in and meant for
/// localhost (a Prometheus agent or node exporter on the same host); the address is the operator's
/// choice, so another one is the operator's explicit opt-in.
/// </summary>
/// <remarks>
/// Exported meters: ours (<c>NbdServer.*</c>) and the runtime's (<c>System.Runtime</c>). Names
/// follow OpenTelemetry's Prometheus mapping, which is the one the dashboards and alert rules were
/// written against: dots become '_', the unit "s" adds <c>_seconds</c> and "By" <c>_bytes</c>, a
/// counter ends in <c>_total</c> (e.g. <c>nbd.frontend.request.duration</c> in seconds is
/// <c>nbd_frontend_request_duration_seconds</c>). One series is new: <c>target_info</c>, naming the
/// service.
/// </remarks>
public sealed class MetricsEndpoint(IPEndPoint endPoint, LocalHttpLimits? limits = null, LogThrottle? throttle = null, string[]? meters = null) : IAsyncDisposable
{
    public const string Path = "/metrics";

    /// <summary>Latency buckets in seconds: 50 µs (a memory read) to 10 s (a degraded write times out at 3 s).</summary>
    public static readonly double[] Buckets = [0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10];

    /// <summary>
    /// The largest scrape the exporter renders (its default is ~166 MiB). A replicated volume's
    /// scrape is about 20 KiB (commands × replicas × histogram buckets, and the runtime's), so this
    /// is 50 times what our labels can produce.
    /// </summary>
    public const int MaxScrapeBytes = 1 << 20;

    /// <summary>The meters exported unless others are named (a trailing '*' matches any rest of the name).</summary>
    public static readonly string[] Meters = ["NbdServer.*", "System.Runtime"];

    private readonly LocalHttpEndpoint _http = new(endPoint, Routes, limits, throttle, services => AddExporter(services, meters ?? Meters, (limits ?? new LocalHttpLimits()).Timeout), $"try GET {Path}");

    public IPEndPoint LocalEndPoint => (IPEndPoint)_http.LocalEndPoint;

    public void Start() => _http.Start();

    public Task StartAsync() => _http.StartAsync();

    public ValueTask DisposeAsync() => _http.DisposeAsync();

    private static void Routes(IEndpointRouteBuilder app) =>
        app.MapPrometheusScrapingEndpoint(Path).WithMetadata(new HttpMethodMetadata([HttpMethods.Get]));

    private static void AddExporter(IServiceCollection services, string[] meters, TimeSpan timeout) =>
        services.AddOpenTelemetry()
            // target_info{service_name="nbd-server"} rather than "unknown_service:nbd-server".
            .ConfigureResource(resource => resource.AddService(AppDomain.CurrentDomain.FriendlyName))
            .WithMetrics(metrics =>
        {
            metrics.AddMeter(meters);
            // Every histogram in the same buckets, the ones the dashboards' quantiles were read from.
            metrics.AddView(instrument => IsHistogram(instrument) ? new ExplicitBucketHistogramConfiguration { Boundaries = Buckets } : null);
            metrics.AddPrometheusExporter(o =>
            {
                // Every scrape is rendered afresh: a cached one would hide a change for the cache's lifetime.
                o.ScrapeResponseCacheDurationMilliseconds = 0;
                // The series as before the exporter: no otel_scope_name/version labels on each.
                o.ScopeInfoEnabled = false;
                o.MaxScrapeResponseSizeBytes = MaxScrapeBytes;
                o.ScrapeResponseTimeoutMilliseconds = (int)timeout.TotalMilliseconds;
            });
        });

    private static bool IsHistogram(Instrument instrument) =>
        instrument.GetType() is { IsGenericType: true } t && t.GetGenericTypeDefinition() == typeof(Histogram<>);
}

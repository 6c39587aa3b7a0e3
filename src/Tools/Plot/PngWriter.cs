using ScottPlot;
using SkiaSharp;

namespace NbdServer.Tools.Plotting;

/// <summary>
/// Renders a set of panels under one title line into a PNG. ScottPlot titles a single panel; a chart
/// of several panels side by side needs its title across all of them, so the title strip is drawn
/// here and the panels below it.
/// </summary>
internal static class PngWriter
{
    public const int MinWidth = 320;
    public const int MaxWidth = 4000;
    public const int MinHeight = 200;
    public const int MaxHeight = 3000;

    private const int TitlePixels = 34;
    private const float TitleFontSize = 17;

    /// <summary>Sans-serif families tried in turn; ScottPlot's own pick on Debian is DejaVu Serif.</summary>
    private static readonly string[] PreferredFonts = ["DejaVu Sans", "Liberation Sans", "Noto Sans"];

    /// <summary>Draws the panels (and the title, if any) and returns the encoded PNG.</summary>
    public static byte[] Encode(Multiplot panels, string title, int width, int height)
    {
        // ScottPlot resolves font names itself (this Skia build has no fontconfig); null = not installed.
        string family = PreferredFonts.FirstOrDefault(f => Fonts.GetTypeface(f, bold: false, italic: false) is not null) ?? Fonts.Default;
        int top = title.Length > 0 ? TitlePixels : 0;
        foreach (Plot plot in panels.GetPlots())
        {
            plot.Font.Set(family);
            plot.Legend.FontName = family;
            foreach (ScottPlot.Plottables.BarPlot bars in plot.GetPlottables().OfType<ScottPlot.Plottables.BarPlot>())
            {
                bars.ValueLabelStyle.FontName = family;
            }
        }
        // The panels are rendered on a surface of their own: a multiplot paints its whole canvas.
        using SKSurface panelSurface = SKSurface.Create(new SKImageInfo(width, height - top, SKColorType.Rgba8888, SKAlphaType.Premul));
        panels.Render(panelSurface);
        using SKImage panelImage = panelSurface.Snapshot();

        using SKSurface surface = SKSurface.Create(new SKImageInfo(width, height, SKColorType.Rgba8888, SKAlphaType.Premul));
        SKCanvas canvas = surface.Canvas;
        canvas.Clear(SKColors.White);
        if (top > 0)
        {
            SKTypeface typeface = Fonts.GetTypeface(family, bold: true, italic: false) ?? SKTypeface.Default;
            using var font = new SKFont(typeface, TitleFontSize);
            using var paint = new SKPaint { Color = SKColors.Black, IsAntialias = true };
            canvas.DrawText(title, width / 2f, TitlePixels - 10, SKTextAlign.Center, font, paint);
        }
        canvas.DrawImage(panelImage, 0, top);
        canvas.Flush();
        using SKImage image = surface.Snapshot();
        using SKData data = image.Encode(SKEncodedImageFormat.Png, 100);
        return data.ToArray();
    }

    /// <summary>Where a panel's data coordinates landed in the picture (after <see cref="Encode"/>).</summary>
    public static (int X, int Y) PixelOf(Plot panel, double x, double y, bool titled)
    {
        Pixel p = panel.GetPixel(new Coordinates(x, y));
        return ((int)Math.Round(p.X), (int)Math.Round(p.Y) + (titled ? TitlePixels : 0));
    }
}
